"""The commands in README.md and docs/*.md name things that exist.

Every fenced shell block (```bash, ```sh, ```shell, ```console) and every `$ ` line of any
fenced block is split into commands. For each: the script or module it runs exists
(`python -m X`, `python path.py`, `bash path.sh`, `path.sh`); every `--run-config` key (and
every `key=value` override of our own scripts) is a run-config key; every `--federation-config`
key is one flwr 1.42 accepts (checked with flwr's own parser); every Hydra override of
`experiments.sweep` names a preset, group option or key of conf/; every `flwr` subcommand is one
of flwr's. Running the commands is left to the tests of each tool: this checks that the text
keeps up with the code.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer.main
import yaml
from flwr.cli.app import app as flwr_cli
from flwr.common.config import parse_config_args
from flwr.supercore.utils import simulation_config_from_json

from split_core.config import default_run_config
from tests.conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```(\S*)\s*$")
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")"}
SHELL_WORDS = {"do", "then", "else", "done", "fi", "wait", "for", "if", "while"}
# Our scripts that take run-config overrides as `key=value` arguments (and extra keys of theirs).
OVERRIDE_TAKERS = {
    "experiments.reference": set(),
    "benchmarks/compare_methods.py": {"clients"},
    "benchmarks/compute_dtype.py": set(),
    "benchmarks/feedback_threads.py": set(),
    "benchmarks/scale_clients.py": set(),
    "benchmarks/wire_formats.py": set(),
}
CONF = ROOT / "conf"


@dataclass(frozen=True)
class Command:
    doc: str
    line: int
    words: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {shlex.join(self.words)}"


def shell_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the shell in a markdown file, continuation lines joined."""
    out: list[tuple[int, str]] = []
    lang = None
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        fence = FENCE.match(raw.strip())
        if fence:
            lang = None if lang is not None else fence.group(1)
            continue
        if lang is None:
            continue
        text = raw.strip()
        if lang not in SHELL_LANGS:
            if not text.startswith("$ "):
                continue
            text = text[2:]
        text = text.removeprefix("$ ") if lang == "console" else text
        if not pending:
            start = number
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        out.append((start, pending + text))
        pending = ""
    return out


def commands(path: Path) -> list[Command]:
    found = []
    for number, text in shell_lines(path):
        # "<" and ">" stay inside words: docs write placeholders as <run-id>, never redirect.
        lexer = shlex.shlex(text, posix=True, punctuation_chars="();|&")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words: list[str] = []
        for token in [*lexer, ";"]:
            if token in SEPARATORS or (token and set(token) <= set("&|;()")):
                if words:
                    found.append(Command(path.name, number, tuple(words)))
                words = []
            else:
                words.append(token)
    return [c for c in (strip_prefix(c) for c in found) if c.words]


def strip_prefix(c: Command) -> Command:
    """Drop environment assignments and shell keywords in front of the command itself."""
    words = list(c.words)
    while words and (re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]) or words[0] in SHELL_WORDS):
        if words[0] == "for":  # for NAME in WORDS...: nothing to check
            return Command(c.doc, c.line, ())
        words.pop(0)
    return Command(c.doc, c.line, tuple(words))


ALL = [c for doc in DOCS for c in commands(doc)]


def by_program(*names: str) -> list[Command]:
    return [c for c in ALL if Path(c.words[0]).name in names]


def python_target(c: Command) -> tuple[str, list[str]] | None:
    """('module:X' or a script path, the arguments after it) of a python command."""
    words = list(c.words[1:])
    while words:
        word = words.pop(0)
        if word == "-m":
            return f"module:{words[0]}", words[1:]
        if word in ("-c",):
            return None
        if word == "-X":
            words.pop(0)
            continue
        if not word.startswith("-"):
            return word, words
    return None


def module_exists(name: str) -> bool:
    ours = ROOT / Path(*name.split("."))
    if ours.with_suffix(".py").is_file() or (ours / "__main__.py").is_file():
        return True
    return name.split(".")[0] not in {
        "flower_app",
        "strategies",
        "split_core",
        "models",
        "benchmarks",
        "scripts",
        "deploy",
    } and (importlib.util.find_spec(name) is not None)


def run_config_keys(value: str) -> list[str]:
    return list(parse_config_args([value]))


def test_the_docs_have_shell_blocks():
    # A broken extractor would pass every test below vacuously.
    assert len(ALL) > 40
    assert by_program("flwr") and by_program("python") and by_program("bash")


@pytest.mark.parametrize("c", by_program("python", "python3"), ids=str)
def test_python_commands_run_something_that_exists(c):
    target = python_target(c)
    if target is None:
        return
    what, args = target
    if what.startswith("module:"):
        assert module_exists(what[7:]), f"{c}: no module {what[7:]}"
    else:
        assert (ROOT / what).is_file(), f"{c}: no file {what}"
    extra = OVERRIDE_TAKERS.get(what.removeprefix("module:"))
    if extra is not None:
        keys = set(default_run_config()) | extra
        for arg in args:
            key = re.match(r"^([a-z][a-z0-9-]*)=", arg)
            if key:
                assert key.group(1) in keys, f"{c}: {key.group(1)} is not a run-config key"


@pytest.mark.parametrize(
    "c", [c for c in ALL if c.words[0] == "bash" or c.words[0].endswith(".sh")], ids=str
)
def test_shell_scripts_exist(c):
    script = c.words[1] if c.words[0] == "bash" else c.words[0]
    assert (ROOT / script).is_file(), f"{c}: no script {script}"


def option_values(c: Command, option: str) -> list[str]:
    words = c.words
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w == option]


@pytest.mark.parametrize("c", [c for c in ALL if "--run-config" in c.words], ids=str)
def test_run_config_keys_exist(c):
    known = set(default_run_config())
    for value in option_values(c, "--run-config"):
        unknown = set(run_config_keys(value)) - known
        assert not unknown, f"{c}: unknown run-config keys {sorted(unknown)}"


@pytest.mark.parametrize("c", [c for c in ALL if "--federation-config" in c.words], ids=str)
def test_federation_config_keys_are_flwrs(c):
    for value in option_values(c, "--federation-config"):
        fields = {k.replace("-", "_"): v for k, v in parse_config_args([value]).items()}
        simulation_config_from_json(fields)  # raises ValueError on an unknown field


def hydra_override_problem(arg: str) -> str | None:
    """What is wrong with one Hydra override of the sweep, or None."""
    key, sep, value = arg.partition("=")
    if not sep or key.startswith(("hydra.", "-")):
        return None
    key = key.lstrip("+~")
    options = value.split(",")
    if key == "experiment":
        missing = [o for o in options if not (CONF / "experiment" / f"{o}.yaml").is_file()]
        return f"no preset {missing}" if missing else None
    if (CONF / key).is_dir():
        missing = [o for o in options if not (CONF / key / f"{o}.yaml").is_file()]
        return f"no {key} option {missing}" if missing else None
    if key.startswith("run_config."):
        name = key.removeprefix("run_config.")
        return None if name in default_run_config() else f"no run-config key {name}"
    top = yaml.safe_load((CONF / "config.yaml").read_text())
    return None if key in top else f"no key {key} in conf/config.yaml"


@pytest.mark.parametrize(
    "c", [c for c in by_program("python") if "experiments.sweep" in c.words], ids=str
)
def test_sweep_overrides_name_real_presets_groups_and_keys(c):
    args = c.words[c.words.index("experiments.sweep") + 1 :]
    problems = [p for a in args if (p := hydra_override_problem(a))]
    assert not problems, f"{c}: {problems}"


FLWR_COMMANDS = set(typer.main.get_command(flwr_cli).commands)


@pytest.mark.parametrize("c", by_program("flwr"), ids=str)
def test_flwr_subcommands_exist(c):
    assert c.words[1] in FLWR_COMMANDS, f"{c}: flwr has no command {c.words[1]}"


def test_every_run_config_key_is_in_the_readme_table():
    table = (ROOT / "README.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    documented = {k for row in rows for k in re.findall(r"`([a-z][a-z0-9-]*)`", row.split("|")[1])}
    missing = set(default_run_config()) - documented
    assert not missing, f"run-config keys missing from README's table: {sorted(missing)}"


def test_the_checks_catch_mistakes():
    """The checks themselves: a wrong key, preset, module or flwr option is caught."""
    assert "no-such-key" not in default_run_config()
    assert hydra_override_problem("+experiment=no_such_preset")
    assert hydra_override_problem("split=cut999")
    assert hydra_override_problem("run_config.no-such-key=1")
    assert hydra_override_problem("num_clients=1,2") is None
    assert not module_exists("flower_app.no_such_module")
    with pytest.raises(ValueError, match="Unknown simulation config"):
        simulation_config_from_json({"num_super_nodes": 4})
    doc = commands_of(
        "```bash\nFOO=1 python -m experiments.report x && bash s.sh \\\n  --y # c\n```"
    )
    assert [c.words for c in doc] == [
        ("python", "-m", "experiments.report", "x"),
        ("bash", "s.sh", "--y"),
    ]


def commands_of(markdown: str) -> list[Command]:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.md"
        path.write_text(markdown)
        return commands(path)
