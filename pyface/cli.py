"""The ``pyface`` command line. Run ``pyface --help`` or ``pyface COMMAND --help``.

Each subcommand lives in its own module, which provides ``add_parser(subparsers)``; the parser
sets ``func`` to a callable taking the parsed args and returning an exit code (README, "Exit
codes": 1 when an input or the work failed, 2 when the command line is wrong). Modules are
imported only to build the parser, and must keep their top-level imports light.

``PYFACE_PARSE_ONLY=1`` checks a command line without running it (``bench/gpu_session.sh
--check`` proves the GPU session's commands so on a CPU): the arguments are parsed by the real
parser (an unknown option, a bad choice or type exits 2), then a command whose parser sets
``check`` (a callable taking the parsed args, returning an exit code) checks its option values
there: train, bench, animate, eval, data synth. Inputs that do not exist yet (checkpoints,
data) and whether the device is present are not checked. Exit 0: the command line is good.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

#: the environment variable that makes ``main`` check a command line instead of running it
PARSE_ONLY = "PYFACE_PARSE_ONLY"


def parse_only() -> bool:
    """Whether ``PYFACE_PARSE_ONLY`` is set (to anything but empty or 0): command lines are
    checked, not run."""
    return os.environ.get(PARSE_ONLY, "") not in ("", "0")

# command -> module providing add_parser(); order is the order of `pyface --help`.
COMMANDS = {
    "info": "pyface.info",
    "bench": "pyface.bench.cli",
    "train": "pyface.train.cli",
    "animate": "pyface.train.animate_cli",
    "invert": "pyface.train.invert_cli",
    "convert": "pyface.convert",
    "data": "pyface.data.cli",
    "eval": "pyface.eval.cli",
}


def plural(n: int, word: str, words: str | None = None) -> str:
    """``plural(1, "frame")`` -> "1 frame", ``plural(2, "frame")`` -> "2 frames" (the commands'
    printed counts); ``words``: the plural when it is not ``word + "s"`` (``"entries"``)."""
    return f"{n} " + (word if n == 1 else words or word + "s")


def file_in_the_way(path: str) -> str | None:
    """The nearest existing ancestor of ``path`` when it is a file (the folder ``path`` needs
    cannot be created there), else None. The commands refuse such an output path before any
    work, in one line: ``--out PATH: cannot create its folder: FILE is a file`` (exit code 2)."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return None if os.path.isdir(parent) else parent


def parse_name_paths(items, option: str = "--weights", *, names=None,
                     must_exist: bool = False) -> dict[str, str]:
    """``["NAME=PATH", ...]`` (a repeatable ``option``) -> ``{NAME: PATH}``, the last one winning.
    ``names``: the accepted NAMEs (any when None); ``must_exist``: each PATH must exist. Raises
    ValueError naming ``option`` and the item (a usage error), FileNotFoundError (an OSError)
    naming them for a PATH that does not exist (an input's failure: exit code 1)."""
    import os

    out: dict[str, str] = {}
    for item in items or ():
        key, sep, path = str(item).partition("=")
        if not sep or not key or not path:
            raise ValueError(f"{option}: expected NAME=PATH, got {item!r}")
        if names is not None and key not in names:
            raise ValueError(f"{option}: expected NAME in {sorted(names)}, got {key!r}")
        if must_exist and not os.path.exists(path):
            raise FileNotFoundError(f"{option} {key}={path}: no such file")
        out[key] = path
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyface",
        description="pyface: fused kernels and trainable 3D-aware portrait-animation models.",
        epilog="Start with `pyface info` to see what is built, then `pyface COMMAND --help`.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    if parse_only():
        return check_only(args)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:   # commands that keep partial work say so themselves
        sub = " ".join(a for a in (args.command, getattr(args, "data_command", None)) if a)
        print(f"\npyface {sub}: interrupted", file=sys.stderr)
        return 130


def check_only(args) -> int:
    """``main`` under ``PYFACE_PARSE_ONLY=1``: the parsed command's ``check`` (its option values;
    nothing run), or nothing more than the parse for a command without one."""
    sub = " ".join(a for a in (args.command, getattr(args, "data_command", None)) if a)
    if args.command == "data" and args.data_command is None:
        return int(args.func(args) or 0)            # its help, exit 2: no subcommand given
    check = getattr(args, "check", None)
    if check is None:
        print(f"pyface {sub}: arguments parsed ({PARSE_ONLY}=1: not run; this command checks "
              "its option values only when run)", file=sys.stderr)
        return 0
    try:
        code = int(check(args) or 0)
    except (ValueError, KeyError, ImportError) as exc:   # ConfigError, RegistryError: ValueErrors
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"pyface {sub}: {msg}", file=sys.stderr)
        return 2
    except OSError as exc:                  # a named input file missing: exit code 1
        print(f"pyface {sub}: {exc}", file=sys.stderr)
        return 1
    if code == 0:
        print(f"pyface {sub}: arguments checked ({PARSE_ONLY}=1: not run)", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
