"""The man page, taskrunner(1), made from the command line's own definitions.

What the page says of the options, the exit statuses, the environment and the ``status``
and ``unlock`` subcommands is the text ``--help`` shows, taken from :mod:`taskrunner.cli`
(:data:`~taskrunner.cli.OPTIONS`, ``USAGE``, ``DESCRIPTION``, ``EXIT_STATUS``, ...) and
:mod:`taskrunner.status` (``USAGE``, ``HELP``), so the two cannot say different things. The
page in the repository, ``man/taskrunner.1``, is installed with the package as
``share/man/man1/taskrunner.1``; the tests fail when it is not what :func:`render` makes
now. Regenerate it with::

    python -m taskrunner.manpage --output man/taskrunner.1

The command line never imports this module: it costs nothing on a run.
"""

from __future__ import annotations

import re
import sys

from taskrunner import __version__, cli, status

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from typing import Callable

PAGE = "man/taskrunner.1"  # in the repository
REGENERATE = f"python -m taskrunner.manpage --output {PAGE}"
SUMMARY = "run a command only when no other run holds its lock"
SEE_ALSO = (("flock", 1), ("timeout", 1), ("chronic", 1), ("cron", 8), ("systemd.timer", 5))

# An option as typed: -c, -vv, --lock-url, or -- alone; not the hyphen inside a word.
_OPTION = r"(?<![\w-])(?:--?[A-Za-z0-9][\w-]*|--(?![\w-]))"
# A word in capitals, a placeholder where it is one of the metavariables (CMD, DURATION).
_CAPITALS = r"\b[A-Z][A-Z0-9_]*\b"
# A word in small letters (a subcommand, a state), or a URL's start: postgresql://...
_WORD = r"\b[a-z][a-z0-9_]*(?:://\S*)?"
_LITERAL = re.compile(rf"(?P<option>{_OPTION})|(?P<caps>{_CAPITALS})|(?P<word>{_WORD})")
_PROSE = re.compile(rf"(?P<option>{_OPTION})|(?P<caps>{_CAPITALS})")
_HEADS = (".SH", ".SS")
_NUMBER = re.compile(r"\d+")
_LABEL = re.compile(r"([a-z][a-z ]*):(?: (.*))?")  # "options:", "exit status: 0 ..."


def render() -> str:
    """The whole page, in roff (man macros). The same for the same version of taskrunner:
    it has no date, so that building it again changes nothing."""
    metavars = _metavariables()
    out = [
        f'.\\" taskrunner(1), made by {REGENERATE}',
        '.\\" from the definitions in src/taskrunner/cli.py and status.py: do not edit.',
        f'.TH TASKRUNNER 1 "" "taskrunner {__version__}" "User Commands"',
        ".ad l",  # ragged right: the long variable names would stretch the spaces between words
        ".SH NAME",
        f"taskrunner \\- {_escape(SUMMARY)}",
        ".SH SYNOPSIS",
        *_synopsis(cli.USAGE),
        ".SH DESCRIPTION",
    ]
    for paragraph in cli.DESCRIPTION.split("\n\n"):
        out += [".PP", *_prose_lines(paragraph, metavars)]

    out += [".SH OPTIONS", ".PP", *_prose_lines(cli.DURATIONS, metavars)]
    # Those that argparse adds (--help, --version) first, as --help lists them.
    ours = {flag for opt in cli.OPTIONS for flag in opt.flags}
    for action in cli.main_parser()._actions:
        if action.option_strings and not ours.intersection(action.option_strings):
            out += _entry(", ".join(action.option_strings), action.help or "", metavars)
    group = None
    for opt in cli.OPTIONS:
        if opt.group != group:
            group = opt.group
            out.append(f".SS {_argument(group[:1].upper() + group[1:])}")
        spell = "" if opt.metavar is None else f" {opt.metavar}"
        out += _entry(", ".join(flag + spell for flag in opt.flags), opt.help, metavars)

    out.append(".SH COMMANDS")
    for command, usage in status.USAGE.items():
        out.append(f".SS {_argument(f'taskrunner {command}')}")
        out += _synopsis(usage)
        for block in status.HELP[command].split("\n\n"):
            out += _block(block, metavars)

    out.append(".SH EXIT STATUS")
    for code, meaning in cli.EXIT_STATUS:
        tag = _substitute(_NUMBER, code, lambda number: f"\\fB{number[0]}\\fR")
        out += [".TP", _line(tag), *_prose_lines(meaning, metavars)]

    out += [".SH ENVIRONMENT", ".PP", *_prose_lines(cli.ENVIRONMENT, metavars)]

    out.append(".SH SEE ALSO")
    for i, (name, section) in enumerate(SEE_ALSO):
        out.append(f".BR {name} ({section}){',' if i < len(SEE_ALSO) - 1 else ''}")
    # A heading starts a paragraph of its own: a .PP straight after one is redundant.
    out = [line for i, line in enumerate(out) if line != ".PP" or out[i - 1][:3] not in _HEADS]
    return "".join(line + "\n" for line in out)


def _metavariables() -> set[str]:
    """The words in capitals that stand for a value: set in italics wherever they appear."""
    usages = [cli.USAGE, *status.USAGE.values()]
    words = {word for usage in usages for word in re.findall(_CAPITALS, usage)}
    return words | {opt.metavar for opt in cli.OPTIONS if opt.metavar is not None}


def _synopsis(usage: str) -> list[str]:
    """Each form of a usage text (``taskrunner ...`` a line) as a synopsis: literal words in
    bold, placeholders in italics, the lines after the first indented under the first."""
    out = []
    for form in usage.splitlines():
        program, _, rest = form.strip().partition(" ")
        out += [f".SY {program}", _line(_literal(rest, bold_words=set(status.USAGE)))]
    return [*out, ".YS"]


def _entry(tag: str, text: str, metavars: set[str]) -> list[str]:
    """A tagged paragraph: an option's spellings (or a state, ...) and what it means."""
    return [".TP", _line(_literal(tag)), *_prose_lines(text, metavars)]


def _block(block: str, metavars: set[str]) -> list[str]:
    """A paragraph of the subcommands' help: prose, perhaps under a label (``options:``),
    perhaps with a table of two-space-indented entries whose deeper lines continue them."""
    out = [".PP"]
    lines = block.splitlines()
    label = _LABEL.fullmatch(lines[0])
    if label:
        lines[0] = label[1].capitalize() + ":" + (f" {label[2]}" if label[2] else "")
    in_table = False
    for line in lines:
        text = line.strip()
        if line.startswith("  ") and not line.startswith("   "):
            tag, _, meaning = text.partition("  ")
            out += [".TP", _line(_literal(tag))]
            out += _prose_lines(meaning.strip(), metavars) if meaning.strip() else []
            in_table = True
        elif line.startswith("   ") and in_table:
            out += _prose_lines(text, metavars)
        else:
            out += [".PP"] if in_table else []
            out += _prose_lines(text, metavars)
            in_table = False
    return out


def _literal(text: str, bold_words: Iterable[str] | None = None) -> str:
    """Something typed, in roff: options (and lower-case words, or only ``bold_words``) in
    bold, words in capitals (placeholders: CMD, LOCKFILE) in italics."""
    words = None if bold_words is None else set(bold_words)

    def one(match: re.Match[str]) -> str:
        token = match[0]
        if match["option"]:
            return _bold(token)
        if match["caps"]:
            return f"\\fI{_escape(token)}\\fR"
        return _bold(token) if words is None or token in words else f"\\fI{_escape(token)}\\fR"

    return _substitute(_LITERAL, text, one)


def _prose_lines(text: str, metavars: set[str]) -> list[str]:
    """Running text, a roff line for each of its lines: the options in it in bold, its
    placeholders and environment variables (TASKRUNNER_NAME) set apart."""

    def one(match: re.Match[str]) -> str:
        token = match[0]
        if match["option"] or "_" in token:
            return _bold(token)
        if token in metavars:
            return f"\\fI{_escape(token)}\\fR"
        return _escape(token)

    return [_line(_substitute(_PROSE, line.strip(), one)) for line in text.splitlines()]


def _substitute(pattern: re.Pattern[str], text: str, one: Callable[[re.Match[str]], str]) -> str:
    """``text`` escaped for roff, with each match of ``pattern`` replaced by ``one(match)``."""
    out, at = [], 0
    for match in pattern.finditer(text):
        out += [_escape(text[at : match.start()]), one(match)]
        at = match.end()
    return "".join([*out, _escape(text[at:])])


def _bold(token: str) -> str:
    """An option (or other literal) in bold, never hyphenated at a line's end (``\\%``), its
    hyphens as ``\\-``: the hyphen-minus a reader types, not a typographic hyphen."""
    escaped = _escape(token).replace("-", "\\-")
    return f"\\%\\fB{escaped}\\fR"


def _escape(text: str) -> str:
    """Plain text for roff: the backslash as ``\\e``, what is not ASCII by its code point."""
    text = text.replace("\\", "\\e")
    return "".join(c if c.isascii() else f"\\[u{ord(c):04X}]" for c in text)


def _line(text: str) -> str:
    """A text line, which must not start as a request does (``.`` or ``'``) nor with a
    space (a break), and must not be empty (a blank line)."""
    text = text.lstrip(" ")
    return "\\&" + text if text[:1] in (".", "'", "") else text


def _argument(text: str) -> str:
    """A macro's argument: quoted, with its quotes as ``\\(dq``."""
    return '"' + _escape(text).replace('"', "\\(dq") + '"'


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m taskrunner.manpage [--output PATH]``: print the page, or write it."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m taskrunner.manpage", description="Print taskrunner's man page."
    )
    parser.add_argument("--output", metavar="PATH", help=f"write it to PATH (as {PAGE})")
    args = parser.parse_args(argv)
    page = render()
    if args.output:
        with open(args.output, "w", encoding="ascii", newline="\n") as f:
            f.write(page)
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
