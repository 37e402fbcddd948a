"""moejax.command_line: the one-line error reporting the three command lines share."""

import errno

import pytest

from moejax import command_line


def parser():
    p = command_line.OneLineParser(prog="python -m tool")
    p.add_argument("--n", type=int, required=True)
    return p


def test_parse_returns_arguments_or_the_exit_status(capsys):
    assert command_line.parse(parser(), ["--n", "3"]).n == 3
    assert command_line.parse(parser(), ["--help"]) == 0
    assert command_line.parse(parser(), ["--n", "x"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["error: argument --n: invalid int value: 'x' (see python -m tool --help)"]


@pytest.mark.parametrize("err,line", [
    (OSError(errno.ENOENT, "No such file or directory", "/data/x"), "error: No such file or directory: /data/x"),
    (OSError(errno.ENOSPC, "No space left on device"), "error: No space left on device"),
    (KeyError("missing tensor 'w'"), "error: missing tensor 'w'"),
    (ValueError("bad --dtype"), "error: bad --dtype"),
], ids=["oserror-path", "oserror", "keyerror", "valueerror"])
def test_report_prints_one_line_and_returns_the_status(capsys, err, line):
    assert command_line.report(err) == 2
    assert command_line.report(err, 3) == 3
    assert capsys.readouterr().err.splitlines() == [line, line]
