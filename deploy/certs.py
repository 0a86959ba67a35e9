"""Certificates and keys of a ``--secure`` local deployment, made with openssl and ssh-keygen.

A CA, a certificate it signs for the SuperLink (localhost, 127.0.0.1, ::1), and one ECDSA P-384
key pair per SuperNode (Flower's SuperNode authentication). Files that exist and still fit are
reused, so registered keys stay valid across restarts. Private keys are written with umask 077.
Every command is an argument list: no file name or value ever goes through a shell.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from deploy.files import private_dir

CURVE = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp384r1", "-nodes"]
SERVER_EXTENSIONS = "\n".join(
    [
        "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1",
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature,keyAgreement",
        "extendedKeyUsage=serverAuth",
    ]
)


def _run(cmd: list[str], cwd: Path) -> None:
    old = os.umask(0o077)
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    finally:
        os.umask(old)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {proc.stderr.strip()[-500:]}")


def _server_cert_valid(certs: Path) -> bool:
    if not (certs / "server.key").is_file() or not (certs / "server.pem").is_file():
        return False
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", "ca.crt", "server.pem"], cwd=certs, capture_output=True
    )
    sans = subprocess.run(
        ["openssl", "x509", "-in", "server.pem", "-noout", "-ext", "subjectAltName"],
        cwd=certs,
        capture_output=True,
        text=True,
    )
    return verify.returncode == 0 and "IP Address:127.0.0.1" in sans.stdout


def make_certs(certs: Path, nodes: int) -> list[str]:
    """CA, SuperLink certificate and ``nodes`` SuperNode key pairs in ``certs``; what was new."""
    for tool in ("openssl", "ssh-keygen"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found (needed by --secure)")
    certs = private_dir(certs)
    made = []
    if not (certs / "ca.key").is_file() or not (certs / "ca.crt").is_file():
        _run(
            ["openssl", "req", "-x509", *CURVE, "-keyout", "ca.key", "-out", "ca.crt"]
            + ["-days", "3650", "-sha384", "-subj", "/CN=split-learning local CA"]
            + ["-addext", "basicConstraints=critical,CA:TRUE"]
            + ["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            certs,
        )
        for stale in ("server.pem", "server.key", "ca.srl"):  # signed by a CA that is gone
            (certs / stale).unlink(missing_ok=True)
        made.append("ca.crt")
    if not _server_cert_valid(certs):
        (certs / "server.ext").write_text(SERVER_EXTENSIONS + "\n")
        _run(
            ["openssl", "req", "-new", *CURVE, "-keyout", "server.key", "-out", "server.csr"]
            + ["-subj", "/CN=localhost"],
            certs,
        )
        _run(
            ["openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key"]
            + ["-CAcreateserial", "-out", "server.pem", "-days", "825", "-sha384"]
            + ["-extfile", "server.ext"],
            certs,
        )
        for temp in ("server.csr", "server.ext"):
            (certs / temp).unlink()
        made.append("server.pem")
    for i in range(nodes):
        key = certs / f"supernode-{i}"
        if key.is_file() and key.with_suffix(".pub").is_file():
            continue
        key.unlink(missing_ok=True)
        key.with_suffix(".pub").unlink(missing_ok=True)
        _run(
            ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", key.name]
            + ["-f", key.name],
            certs,
        )
        made.append(key.name)
    return made
