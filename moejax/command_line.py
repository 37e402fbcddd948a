"""How the command-line tools (``python -m train``, ``python -m serve``,
``python -m moejax.convert``) report bad input: one ``error:`` line on stderr and
exit status 2, never argparse's usage block or a traceback."""

from __future__ import annotations

import argparse
import sys


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and shows every meaningful default: a flag
    whose default is None, a switch or an empty list says what it means itself."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        hidden = default is None or isinstance(default, bool) or default == [] or default == argparse.SUPPRESS
        if not hidden and "%(default)" not in text:
            text += " (default %(default)s)"
        return text


class OneLineParser(argparse.ArgumentParser):
    """argparse whose argument errors are one line naming ``--help`` and whose
    ``--help`` shows the defaults (subcommands' parsers too)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | int:
    """The parsed arguments, or the exit status where argparse stopped (``--help``: 0;
    a bad argument: 2, its line already printed)."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2


def report(err: BaseException, status: int = 2) -> int:
    """Print ``err`` as one error line and return ``status``. An OSError reads
    'reason: path' (no errno), a KeyError its message without quotes."""
    message: object = err
    if isinstance(err, OSError) and err.strerror:
        message = f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    elif isinstance(err, KeyError) and err.args:
        message = err.args[0]
    print(f"error: {message}", file=sys.stderr, flush=True)
    return status
