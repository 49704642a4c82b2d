"""The man page: made from the command line's definitions, current, well-formed, installed."""

from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from taskrunner import __version__, cli, manpage, status
from taskrunner.manpage import render

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / manpage.PAGE
INSTALLED = "share/man/man1/taskrunner.1"  # under the prefix; in a wheel, under NAME.data/data


def roff(option: str) -> str:
    """An option as the page spells it: its hyphens as roff's ``\\-``."""
    return option.replace("-", "\\-")


def test_the_page_in_the_repository_is_current():
    committed, made = PAGE.read_text(encoding="ascii"), render()
    if committed != made:
        diff = "".join(
            difflib.unified_diff(
                committed.splitlines(keepends=True),
                made.splitlines(keepends=True),
                manpage.PAGE,
                "render()",
            )
        )
        pytest.fail(
            f"{manpage.PAGE} is not what the command line's definitions make now; regenerate "
            f"it, from the top of the checkout, with\n\n    {manpage.REGENERATE}\n\n"
            f"and commit it.\n{diff}",
            pytrace=False,
        )


def test_the_command_prints_or_writes_the_page(tmp_path: Path):
    printed = subprocess.run(
        [sys.executable, "-m", "taskrunner.manpage"], capture_output=True, text=True, check=True
    )
    assert printed.stdout == render()
    out = tmp_path / "taskrunner.1"
    subprocess.run([sys.executable, "-m", "taskrunner.manpage", "--output", str(out)], check=True)
    assert out.read_bytes() == render().encode("ascii")


def test_the_page_has_every_section_and_no_date():
    page = render()
    lines = page.splitlines()
    # The version only, no date: the same page however often, and whenever, it is made.
    assert f'.TH TASKRUNNER 1 "" "taskrunner {__version__}" "User Commands"' in lines
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "COMMANDS", "EXIT STATUS"):
        assert f".SH {section}" in lines
    assert lines.index(".SH ENVIRONMENT") < lines.index(".SH SEE ALSO")
    assert ".BR flock (1)," in lines
    for group in dict.fromkeys(opt.group for opt in cli.OPTIONS):
        assert f'.SS "{group[:1].upper()}{group[1:]}"' in lines
    assert '.SS "taskrunner status"' in lines
    assert '.SS "taskrunner unlock"' in lines


def test_every_option_exit_status_and_variable_is_in_the_page():
    page = render()
    for opt in cli.OPTIONS:
        for flag in opt.flags:
            assert f"\\fB{roff(flag)}\\fR" in page, flag
        if opt.metavar is not None:
            assert f"\\fB{roff(opt.flags[-1])}\\fR \\fI{opt.metavar}\\fR" in page
    for flag in ("-h", "--help", "--version"):
        assert f"\\fB{roff(flag)}\\fR" in page
    for code, _ in cli.EXIT_STATUS:
        for number in re.findall(r"\d+", code):
            assert f"\\fB{number}\\fR" in page
    for variable in re.findall(r"TASKRUNNER_\w+", cli.ENVIRONMENT):
        assert f"\\fB{variable}\\fR" in page
    # The subcommands' own options, as their --help names them.
    for command, text in status.HELP.items():
        flags = set(re.findall(r"(?<![\w-])--?[a-z][\w-]*", text))
        assert flags, command
        for flag in flags:
            assert f"\\fB{roff(flag)}\\fR" in page, (command, flag)
    assert "\\fBstatus\\fR [\\%\\fB\\-\\-json\\fR]" in page


def test_the_page_is_escaped_for_roff():
    page = render()
    for line in page.splitlines():
        assert line, "a blank line is a paragraph break of its own"
        assert not line.startswith(" "), line
        if not line.startswith("."):
            assert not line.startswith("'"), line
            # Every hyphen in an option is roff's \-: none is left as a plain hyphen.
            for bold in re.findall(r"\\fB(.*?)\\fR", line):
                assert not re.search(r"(?<!\\)-", bold), line
    assert page.isascii()


def test_odd_text_is_escaped():
    assert manpage._escape("a\\b") == "a\\eb"
    assert manpage._escape("caf\u00e9") == "caf\\[u00E9]"
    assert manpage._line(".starts like a request") == "\\&.starts like a request"
    assert manpage._line("'so does this") == "\\&'so does this"
    assert manpage._line("") == "\\&"
    assert manpage._argument('say "x"') == '"say \\(dqx\\(dq"'
    assert manpage._literal("-c CMD [--log-file=PATH]") == (
        "\\%\\fB\\-c\\fR \\fICMD\\fR [\\%\\fB\\-\\-log\\-file\\fR=\\fIPATH\\fR]"
    )
    # A hyphen inside a word is a hyphen; one that starts an option is a minus.
    assert manpage._prose_lines("home-grown, -vv and --kill-after", set()) == [
        "home-grown, \\%\\fB\\-vv\\fR and \\%\\fB\\-\\-kill\\-after\\fR"
    ]


def _linters() -> list[tuple[str, list[str]]]:
    return [
        # man-db, as `man` runs it: groff's warnings on stderr.
        ("man", ["man", "--warnings", "-l", str(PAGE)]),
        ("groff", ["groff", "-man", "-Tutf8", "-ww", "-z", str(PAGE)]),
        ("mandoc", ["mandoc", "-T", "lint", "-W", "warning", str(PAGE)]),
    ]


@pytest.mark.parametrize(("tool", "command"), _linters(), ids=[t for t, _ in _linters()])
def test_the_page_renders_without_warnings(tool: str, command: list[str]):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")
    env = {**os.environ, "MANWIDTH": "80", "MANPAGER": "cat", "PAGER": "cat", "LC_ALL": "C.UTF-8"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    warnings = result.stderr.splitlines()
    if tool == "mandoc":
        # The page has no date on purpose (the version stands for it): made again, it is
        # the same, byte for byte.
        warnings = [w for w in warnings if "WARNING: missing date" not in w]
        assert result.returncode in (0, 2), result.stderr  # 2: warnings, all of them listed
    else:
        assert result.returncode == 0, result.stderr
    assert warnings == []


def test_the_rendered_page_spells_every_option_as_typed():
    """What a reader sees, and searches for with / in the pager: each option in plain ASCII
    hyphens, never broken across lines."""
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    text = subprocess.run(
        ["groff", "-man", "-Tutf8", "-P-cbou", "-rLL=78n", str(PAGE)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "LC_ALL": "C.UTF-8"},
    ).stdout
    words = set(text.split())
    for opt in cli.OPTIONS:
        for flag in opt.flags:
            assert any(word.strip("[],") == flag for word in words), flag
    assert "taskrunner - run a command only when no other run holds its lock" in text


def test_the_wheel_installs_the_page_under_share_man(tmp_path: Path):
    """Built as pip builds it; installed, the page lands in PREFIX/share/man/man1, where
    man-db finds it from PREFIX/bin on PATH."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        timeout=600,
    )
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        pages = [name for name in zf.namelist() if name.endswith(f".data/data/{INSTALLED}")]
        assert len(pages) == 1, zf.namelist()
        assert zf.read(pages[0]) == PAGE.read_bytes()
        # Once: not also inside the package, which never reads it.
        assert [name for name in zf.namelist() if name.endswith("taskrunner.1")] == pages


def test_the_command_line_never_imports_the_man_page_module(tmp_path: Path):
    lock = tmp_path / "x.lock"
    code = (
        "import sys, contextlib, io\n"
        "from taskrunner.cli import main\n"
        f"assert main(['-l', {str(lock)!r}, '-c', 'true']) == 0\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['--help']) == 0\n"
        "assert 'taskrunner.manpage' not in sys.modules, 'imported on the run path'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
