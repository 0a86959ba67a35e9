"""The deployment's own files: a directory only its owner can write, PIDs, secrets, task tokens.

A deployment directory holds private keys, the SuperExec shared secrets, task tokens in flight
and the PIDs that ``stop`` signals. Anyone else who could write there could plant a PID (and
have us kill their choice of process), swap a key, or read a token. So the directory is created
mode 0700 and refused when it belongs to someone else, is a symbolic link, or is writable by
group or others; files with secrets are created mode 0600; and the PID file is parsed strictly
(a name and a number per line) and never given to a shell.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path


class DeployDirError(RuntimeError):
    """The deployment directory (or a file in it) is not safe to use; the message says why."""


def private_dir(path: Path) -> Path:
    """``path`` as a directory that only we can write: created mode 0700, or checked.

    An existing directory of ours that others may read is tightened to 0700; one that others
    may write, that another user owns, or that is a symbolic link is refused (something may
    already have been planted there).
    """
    path = Path(path).expanduser().absolute()
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise DeployDirError(f"{path} is a symbolic link; use a real directory")
    if not stat.S_ISDIR(info.st_mode):
        raise DeployDirError(f"{path} exists and is not a directory")
    if info.st_uid != os.geteuid():
        raise DeployDirError(
            f"{path} is owned by uid {info.st_uid}, not by us (uid {os.geteuid()}); "
            "choose another DEPLOY_DIR"
        )
    if info.st_mode & 0o022:
        raise DeployDirError(
            f"{path} is writable by group or others (mode {stat.S_IMODE(info.st_mode):o}); "
            "remove it or choose another DEPLOY_DIR"
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def write_private(path: Path, data: bytes, exclusive: bool = False) -> Path:
    """Write ``data`` to a file only we can read (mode 0600, also when it existed)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC) | os.O_NOFOLLOW
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)
    return Path(path)


def new_secret(path: Path, nbytes: int = 32) -> Path:
    """A fresh random secret (the SuperExec HMAC key) in a 0600 file."""
    return write_private(path, os.urandom(nbytes))


# -- PIDs -----------------------------------------------------------------------------------------

NAME = re.compile(r"[a-z][a-z0-9-]{0,40}")
PID_LINE = re.compile(
    r"(?P<name>[a-z][a-z0-9-]{0,40}) (?P<pid>[1-9][0-9]{0,9}) (?P<start>[0-9]{1,20})"
)


@dataclass(frozen=True)
class Recorded:
    """A process we started: its name, PID and start time (so a reused PID is never signalled)."""

    name: str
    pid: int
    start: int  # clock ticks after boot, /proc/<pid>/stat field 22


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot), or None when there is no such process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[19])


def append_pid(path: Path, name: str, pid: int) -> Recorded:
    if not NAME.fullmatch(name):
        raise ValueError(f"bad process name {name!r}")
    started = start_time(pid)
    if started is None:
        raise DeployDirError(f"{name} (PID {pid}) exited at once")
    entry = Recorded(name, pid, started)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, f"{name} {pid} {started}\n".encode())
    finally:
        os.close(fd)
    return entry


def read_pids(path: Path) -> list[Recorded]:
    """The processes recorded in ``path``; any other content is refused, naming the line."""
    if not os.path.lexists(path):
        return []
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise DeployDirError(f"{path} is not a regular file of ours that only we can write")
    entries = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        match = PID_LINE.fullmatch(line)
        if match is None:
            raise DeployDirError(
                f"{path} line {number}: expected '<name> <pid> <start time>', got {line[:80]!r}"
            )
        entries.append(Recorded(match["name"], int(match["pid"]), int(match["start"])))
    return entries


def is_running(entry: Recorded) -> bool:
    """The recorded process itself is alive (same PID and start time, not a zombie)."""
    try:
        text = Path(f"/proc/{entry.pid}/stat").read_text()
    except OSError:
        return False
    fields = text.rsplit(")", 1)[1].split()
    return fields[0] != "Z" and int(fields[19]) == entry.start
