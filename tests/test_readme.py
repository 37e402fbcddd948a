"""README.md stays true to the code, cheaply: every dotted name it shows resolves after a
plain ``import moejax`` / ``import serve`` / ``import kernels_pallas``, every command line it
shows parses with the real parser, and every ``--flag`` it names exists. (Running the
commands and snippets takes minutes; tests/train, tests/serve and the notebooks do that.)"""

from __future__ import annotations

import dataclasses
import importlib
import re
import shlex
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
PACKAGES = ("moejax", "kernels_pallas", "serve")
# flags of scripts outside the three command lines (benchmarks/)
OTHER_FLAGS = {"--malloc-tuning"}


def dotted_names() -> list[str]:
    """``moejax.memory.product_key_topk``, ``serve.OffloadConfig``, ... as the README spells them."""
    names = re.findall(rf"(?<![\w/.])((?:{'|'.join(PACKAGES)})(?:\.[A-Za-z_]\w*)+)", README)
    return sorted(set(names))


def command_lines() -> list[str]:
    """``python -m train|serve|moejax.convert ...`` from the shell blocks and inline code,
    without comments; an optional ``[--flag value]`` is kept (it must parse too)."""
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", README, re.S)).splitlines()
    prose = re.sub(r"```.*?```", "", README, flags=re.S)
    inline = [" ".join(code.split()) for code in re.findall(r"`([^`]+)`", prose)]
    lines = [line.split("#")[0].strip() for line in blocks + inline]
    lines = [line[line.index("python -m "):] for line in lines if "python -m " in line]
    # a bare 'python -m moejax.convert' or '--help' names the tool, it is not a run to parse
    return sorted({line.replace("[", "").replace("]", "") for line in lines
                   if re.match(r"python -m (train|serve|moejax\.convert) (?!--help)", line)})


def resolve(dotted: str):
    head, first, *rest = dotted.split(".")
    package = importlib.import_module(head)
    # a package with a lazy table (PEP 562) is asked through it: that is what a fresh
    # ``import moejax`` offers, whatever submodules other imports have loaded by now
    lazy = package.__dict__.get("__getattr__")
    value = lazy(first) if lazy is not None else getattr(package, first)
    for part in rest:
        if dataclasses.is_dataclass(value) and part in {f.name for f in dataclasses.fields(value)}:
            return value   # a config field without a class-level default
        value = getattr(value, part)
    return value


def parser_of(command: str):
    if command == "train":
        from train.cli import build_parser
    elif command == "serve":
        from serve.cli import build_parser
    else:
        from moejax.convert.__main__ import build_parser
    return build_parser()


def all_flags() -> set[str]:
    import argparse
    flags = set()
    for command in ("train", "serve", "moejax.convert"):
        parsers = [parser_of(command)]
        while parsers:
            p = parsers.pop()
            for action in p._actions:
                flags.update(action.option_strings)
                if isinstance(action, argparse._SubParsersAction):
                    parsers.extend(action.choices.values())
    return flags


def test_readme_names_resolve():
    names = dotted_names()
    assert len(names) > 10   # the extraction found them
    missing = []
    for name in names:
        try:
            resolve(name)
        except (AttributeError, ImportError) as err:
            missing.append(f"{name}: {err}")
    assert missing == []


def test_readme_command_lines_parse(capsys):
    lines = command_lines()
    assert len(lines) > 8
    refused = []
    for line in lines:
        command, *argv = shlex.split(line)[2:]
        try:
            parser_of(command).parse_args(argv)
        except SystemExit:     # argparse: an unknown flag, a bad choice, a missing argument
            refused.append(f"{line}: {capsys.readouterr().err.strip()}")
    assert refused == []


def test_readme_flags_exist():
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", README)) - OTHER_FLAGS
    assert named - all_flags() == set()
