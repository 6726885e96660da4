"""`factory --version` and the help of every command, as a user reads them at 100 columns."""

from __future__ import annotations

import importlib.metadata
import itertools
import re
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from factory import cli
from tests.conftest import factory

WIDTH = 100


def commands() -> list[tuple[list[str], Any]]:
    """Every command path (the top level, groups and their commands) with its click command."""
    found: list[tuple[list[str], Any]] = []

    def walk(path: list[str], command: Any) -> None:
        found.append((path, command))
        for name, sub in getattr(command, "commands", {}).items():  # a group
            walk([*path, name], sub)

    walk([], typer.main.get_command(cli.app))
    return found


def help_of(path: list[str]) -> str:
    result = CliRunner().invoke(cli.app, [*path, "--help"], env={"COLUMNS": str(WIDTH)})
    assert result.exit_code == 0, result.output
    return result.output


def flat(text: str) -> str:
    """The words of a help screen in order, without the panels' borders."""
    return " ".join(text.replace("│", " ").split())


def early_breaks(text: str) -> list[str]:
    """Lines that end although the next line's first word would have fit after them: a
    line break that came from the source, not from wrapping (the bug: `clean` and `boot`
    broke where their docstrings' lines ended). A bracketed `[default: ...]` moves whole."""
    found = []
    lines = text.splitlines()
    for first, second in itertools.pairwise(lines):
        boxed = first.startswith("│") and first.rstrip().endswith("│")
        if boxed != (second.startswith("│") and second.rstrip().endswith("│")):
            continue
        a = first.rstrip()[1:-1] if boxed else first.rstrip()
        b = second.rstrip()[1:-1] if boxed else second.rstrip()
        right = (len(a) if boxed else WIDTH) - 1  # the last column text may use
        if not b.strip() or not a.strip():
            continue
        start = len(b) - len(b.lstrip())
        # A continuation: the line above has text in the same column, after a space; in a
        # panel, a line that starts in its first column is a new row.
        if start < (2 if boxed else 1) or start >= len(a.rstrip()):
            continue
        if a[start - 1] != " " or a[start] == " ":
            continue
        head = b[start:]
        word = re.match(r"\[[^\]]*\]|\S+", head)
        assert word is not None
        if len(a.rstrip()) + 1 + len(word.group()) <= right:
            found.append(f"{first.rstrip()}\n{second.rstrip()}")
    return found


def test_version_prints_the_installed_version() -> None:
    result = factory("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"factory {importlib.metadata.version('factory')}\n"
    assert re.fullmatch(r"factory \d+\.\d+\.\d+\n", result.stdout)


def test_version_through_typer() -> None:
    result = CliRunner().invoke(cli.app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"factory {importlib.metadata.version('factory')}"


@pytest.mark.parametrize("path", [p for p, _ in commands()], ids=lambda p: " ".join(p) or "factory")
def test_help_reads_as_whole_sentences(path: list[str]) -> None:
    text = help_of(path)
    assert max(len(line) for line in text.splitlines()) == WIDTH  # rendered at 100 columns
    assert early_breaks(text) == []
    command = dict((tuple(p), c) for p, c in commands())[tuple(path)]
    if command.help:  # the whole docstring, every paragraph on one line
        assert flat(cli.reflow(command.help)) in flat(text)
    for param in command.params:
        help_text = getattr(param, "help", None)
        if help_text:  # nothing eaten as markup, e.g. "[default: out/NAME]"
            assert flat(help_text) in flat(text), param.name
    for name, sub in getattr(command, "commands", {}).items():  # a group's list, whole
        summary = cli.reflow(sub.help or "").split("\n\n")[0]
        assert flat(f"{name} {summary}") in flat(text)


def test_the_check_sees_a_break_from_the_source() -> None:
    """What `factory --help` showed for `clean` before its help was reflowed."""
    broken = (
        "│ clean   Undo what killed runs left behind: their processes, mounts, loop devices"
        " and" + " " * 13 + "│\n"
        "│         half-built trees." + " " * 73 + "│\n"
    )
    assert len(broken.splitlines()[0]) == WIDTH
    assert early_breaks(broken) != []
    header = (
        " Boot IMAGE in QEMU and wait for its login prompt (exit 0), or fail with the\n"
        " console's last lines (exit 1).\n"
    )
    assert early_breaks(header) != []


def test_reflow_keeps_paragraphs() -> None:
    doc = """First line
    goes on.

    Second paragraph
    here."""
    assert cli.reflow(doc) == "First line goes on.\n\nSecond paragraph here."
