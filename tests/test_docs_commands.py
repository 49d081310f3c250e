"""The commands and code references of README.md and docs/**/*.md match the code.

What is checked (nothing is run: no training, no data, no network):

* ``pyface ...``, ``python -m pyface ...`` (any ``.../python``) and the part after ``-m pyface``
  of a ``torchrun`` line are parsed by the real parser, :func:`pyface.cli.build_parser`.
  Options must be spelled out in full (argparse's abbreviations are refused here, so a renamed
  option that the old name abbreviates is still caught).
* ``--set key=value`` of ``pyface train MODEL`` and ``python -m pyface.bench.train MODEL`` (the
  example model when MODEL is not given) for a registered MODEL: the config is built as
  ``pyface train`` builds it (the model's recipe, ``--preset``, the ``--set`` items, the
  ``stages.<stage>.<key>`` items and the stages' configs), so an unknown key or a value of the
  wrong type fails (``train.run_dir`` is replaced by a folder of an empty directory, so no
  finished stage run on this machine is compared). ``pyface data cache --set key=value``: the
  key is a field of SynthConfig.
* ``pyface eval --metrics a,b``: each name is a metric; ``pyface bench OP ...``: each OP is an
  op family or an op of the benchmark cases.
* ``python -m pyface.X ...``: the module exists, and when it has ``main(argv)`` its argument
  parser accepts the arguments (its ``parse_args`` stops the run right after parsing).
* ``python tools/X.py ...``: the file exists, and every ``--option`` is one its
  ``add_argument`` calls declare (read from the source, the tool is not imported).
* ``python -m pytest PATH[::NAME]``: the test file exists and defines NAME.
* References in the text, in and out of code spans: ``path/to/file.py:Symbol`` and
  ``tests/test_x.py::test_name`` (the file exists and defines the symbol; read with ``ast``),
  paths under pyface/, tools/, tests/, bench/, examples/ (the file exists) and dotted names
  ``pyface.x.Y`` (the module exists and defines Y, read with ``ast``, else imported), and the
  ``import pyface...`` / ``from pyface... import Y`` lines of ``python`` blocks; the keyword
  arguments of a call ``pyface.x.f(..., name=...)`` in a code span are parameters of ``f``; a
  test named alone in a code span (``test_exact_resume...``) is defined under tests/ or bench/.

Where commands are found: every line of a fenced ``bash``/``sh``/``console`` block or one
without a language (``\\`` continuations joined, ``# comments`` and a leading ``$ `` dropped)
and every code span. A line is split into commands at ``;``, ``&&``, ``||`` and `` | ``
(a pipe: ``|`` with spaces on both sides); ``VAR=value`` prefixes, ``time``, ``nice -n N``,
``timeout N`` and redirections are dropped; ``for x in a b; do CMD; done`` runs CMD once per
value. A line whose command word is followed by ``word:`` (``pyface train: ...``) is a
printed message, not a command.

Placeholders (the rule of what is substituted or skipped):

* an UPPER-CASE word (``MODEL``, ``RUN``, ``N``, ``IMG_OR_VIDEO_FOLDER``), a token holding
  ``<...>`` and a shell variable ``$x`` are placeholders. As a value (of an option or a
  positional argument) a placeholder is accepted without its type or choices being checked;
  the option that takes it is still checked. As a (sub)command name (``pyface COMMAND``,
  ``pyface data SUBCOMMAND``) the words before it are checked, the rest is not.
  A ``--set`` whose key holds a placeholder is not checked; one whose value is a placeholder
  has its key checked (it exists in the config dataclasses) but not its value.
* ``[...]`` marks optional parts: the brackets are dropped and what they hold is checked.
* ``a|b`` inside one token, and ``{a,b}`` as a whole token, list alternatives: the command is
  checked once for each.
* ``...`` marks omitted arguments: as a value (``--set ...``, ``--set key=...``) it is a
  placeholder, left over it is ignored, and the command is checked as a fragment. A code span
  that ends with an option (``pyface data bench --root``) names the option: it is checked as
  if ``...`` followed.
* A code span, or a command with ``...``, is a fragment: a missing required argument is not an
  error there (every option and value given is still checked). A command of a fenced block
  without ``...`` is complete: its required arguments must be present.
* A train/animate/eval/bench model name that is not a placeholder must be registered (or be a
  baseline of ``pyface eval``; also each NAME of ``pyface eval --runs NAME=RUN``), except the
  guides' made-up names in EXAMPLE_MODELS and a command that imports a plugin (``--import``).

ALLOWED lists the few lines that deliberately show something that no longer parses, each with
its reason; an entry that matches nothing fails the test, so the list cannot go stale.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import glob
import importlib
import importlib.util
import io
import itertools
import re
import shlex
import types
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")        # also indented in a list item
CODE_SPAN = re.compile(r"(`+)((?:(?!\1).)+?)\1", re.S)
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}

# model names that the guides make up -> where (not registered: a command naming one is parsed,
# its --set keys are not checked; a file or module named after one is not looked for)
EXAMPLE_MODELS = {
    "mine": "docs/train.md, Plugins: the user's own package",
    "mymodel": "docs/train.md, Adding a model: the user's own model",
    "toyplane": "examples/plugin/toyplane.py, registered by --import toyplane",
    "foo": "docs/DEVELOPING.md, Adding a model / an op: the new model's or op's name",
    "stage2": "docs/train.md, Multi-stage models: a model with a stage",
}

# (file relative to the root, a substring of the command or setting) -> why it may fail the check
ALLOWED: dict[tuple[str, str], str] = {
    ("docs/train.md", "--set model.stage1_checkpoint=PATH"):
        "the stage key of the made-up model stage2 (Multi-stage models)",
}


# --------------------------------------------------------------------------------------------
# finding commands
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Snippet:
    file: str               # relative to ROOT
    line: int
    text: str
    fragment: bool          # a code span (may show part of a command)


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _blocks(text: str):
    """(kind, language, [(line number, line)]) of a markdown text: kind 'fence' for a fenced
    block's body, 'prose' for a paragraph, list item or table row outside fences."""
    fence = lang = None
    body: list = []
    para: list = []
    for i, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None and m:
            if para:
                yield "prose", None, para
                para = []
            fence, lang, body = m.group(1)[0] * 3, m.group(2).lower(), []
            continue
        if fence is not None:
            if m and m.group(1).startswith(fence) and not m.group(2):
                yield "fence", lang, body
                fence = None
            else:
                body.append((i, line))
            continue
        starts_item = re.match(r"^\s*([*+-]|\d+[.)]|\||#{1,6})\s", line) or line.startswith("|")
        if not line.strip() or starts_item:
            if para:
                yield "prose", None, para
            para = [(i, line)] if line.strip() else []
        else:
            para.append((i, line))
    if para:
        yield "prose", None, para


def snippets(path: Path) -> list[Snippet]:
    rel = path.relative_to(ROOT).as_posix()
    out = []
    for kind, lang, lines in _blocks(path.read_text(encoding="utf-8")):
        if kind == "fence":
            if lang not in SHELL_FENCES:
                continue
            joined, start = "", None
            for i, line in lines:
                start = i if start is None else start
                if line.rstrip().endswith("\\"):
                    joined += line.rstrip()[:-1] + " "
                    continue
                out.append(Snippet(rel, start, joined + line, False))
                joined, start = "", None
            if joined:
                out.append(Snippet(rel, start, joined, False))
        else:
            text = "\n".join(line for _, line in lines)
            for m in CODE_SPAN.finditer(text):
                line = lines[0][0] + text.count("\n", 0, m.start())
                out.append(Snippet(rel, line, " ".join(m.group(2).split()), True))
    return out


def _strip_comment(line: str) -> str:
    return re.split(r"(?:^|\s)#", line, maxsplit=1)[0]


def _for_loops(line: str) -> list[str]:
    """``for x in a b; do CMD; done`` -> CMD once per value, with $x / ${x} substituted."""
    m = re.search(r"\bfor (\w+) in ([^;]*); do (.*?);? done\b", line)
    if not m:
        return [line]
    var, values, body = m.group(1), m.group(2).split(), m.group(3)
    pre, post = line[:m.start()], line[m.end():]
    return [pre + re.sub(r"\$\{?" + var + r"\b\}?", v, body) + post for v in values]


ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def commands(text: str) -> list[list[str]]:
    """The argv lists of the commands of a snippet whose word is pyface, torchrun, pytest or
    python (any .../python; prefixes such as VAR=1, time, nice dropped)."""
    text = _strip_comment(text.strip())
    text = re.sub(r"^\$\s+", "", text)
    out = []
    for line in _for_loops(text):
        for piece in re.split(r"\s*(?:;|&&|\|\|)\s+|\s+\|\s+|\s*;$", line):
            try:
                argv = shlex.split(piece)
            except ValueError:          # an unbalanced quote (an apostrophe in prose)
                argv = piece.split()
            while argv and (ENV.match(argv[0]) or argv[0] in ("time", "env", "(", "exec")):
                argv = argv[1:]
            while argv and argv[0] in ("nice", "timeout"):
                argv = argv[1:]
                while argv and (argv[0].startswith("-") or re.fullmatch(r"[\d.]+[smh]?", argv[0])):
                    argv = argv[1:]
            argv = _drop_redirections(argv)
            if not argv:
                continue
            word = argv[0]
            if word in ("pyface", "torchrun", "pytest") or re.fullmatch(r"(\S*/)?python3?", word):
                out.append([word.rsplit("/", 1)[-1]] + argv[1:])
    return out


def _drop_redirections(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if re.fullmatch(r"\d?>>?|<", a):
            skip = True
            continue
        if re.fullmatch(r"\d?>>?\S+|\d?>&\d|&", a):
            continue
        out.append(a.rstrip(")") if a.endswith(")") and "(" not in a else a)
    return out


# --------------------------------------------------------------------------------------------
# placeholders
# --------------------------------------------------------------------------------------------

UPPER = re.compile(r"[A-Z][A-Z0-9]*(?:[_-][A-Z0-9]+)*")


def placeholder_path(path: str) -> bool:
    """A path or dotted module name with a placeholder part (``tools/X.py``, ``RUN/config.yaml``,
    ``bench/results/train-MODEL.json``, ``pyface/ops/<family>.py``)."""
    return bool(re.search(r"<[^<>]*>", path)) or any(
        is_placeholder(p) for p in re.split(r"[/._-]", path) if p)


def is_placeholder(token: str) -> bool:
    return bool(UPPER.fullmatch(token) or re.search(r"<[^<>]*>", token)
                or re.match(r"\$\{?\w", token) or token in ("...", "…"))


def expand(argv: list[str], fragment_hint: bool = False) -> tuple[list[list[str]], bool]:
    """The concrete argvs of a command with ``[...]``, ``...`` and ``a|b`` (see the module
    docstring), and whether ``...`` made it a fragment."""
    fragment = False
    tokens = []
    for a in argv:
        if a.startswith("["):
            a = a[1:]
        while a.endswith("]") and a.count("[") < a.count("]"):
            a = a[:-1]
        if a == "":
            continue
        if a in ("...", "…"):
            fragment = True
        brace = re.fullmatch(r"\{([^{}]*,[^{}]*)\}", a)
        if brace:
            tokens.append(brace.group(1).split(","))
        elif "|" in a and not is_placeholder(a):
            tokens.append(a.split("|"))
        else:
            tokens.append([a])
    if fragment_hint and tokens and tokens[-1][0].startswith("-"):
        tokens.append(["..."])          # a span ending with an option names it, not its value
        fragment = True
    return [list(p) for p in itertools.product(*tokens)], fragment


# --------------------------------------------------------------------------------------------
# parsing with the real parsers, without running anything
# --------------------------------------------------------------------------------------------

class ParseError(Exception):
    pass


class Parsed(Exception):
    def __init__(self, namespace):
        super().__init__("parsed")
        self.namespace = namespace


@contextlib.contextmanager
def strict_argparse(fragment: bool, stop_after_parse: bool = False):
    """argparse that raises ParseError instead of exiting, accepts no abbreviations, takes
    placeholders as any value and, for a fragment, requires no argument. With
    ``stop_after_parse``, ``parse_args`` raises Parsed(namespace) (a module's main() stops
    there)."""
    P = argparse.ArgumentParser
    saved = {k: getattr(P, k) for k in ("error", "exit", "_get_option_tuples", "_get_value",
                                          "_check_value", "parse_known_args", "parse_args")}

    def error(self, message):
        raise ParseError(f"{self.prog}: {message}")

    def exit(self, status=0, message=None):
        if status:
            raise ParseError(f"{self.prog}: exit {status}: {message}")
        raise Parsed(None)       # --help

    def get_value(self, action, arg_string):
        if is_placeholder(arg_string):
            return arg_string
        return saved["_get_value"](self, action, arg_string)

    def check_value(self, action, value):
        if isinstance(value, str) and is_placeholder(value):
            return
        return saved["_check_value"](self, action, value)

    def parse_known_args(self, args=None, namespace=None):
        required = [(a, a.required) for a in self._actions]
        if fragment:
            for a, _ in required:
                a.required = False
        try:
            return saved["parse_known_args"](self, args, namespace)
        finally:
            for a, r in required:
                a.required = r

    def parse_args(self, args=None, namespace=None):
        ns, extras = self.parse_known_args(args, namespace)
        extras = [a for a in extras if a not in ("...", "…")]      # omitted arguments
        if extras:
            self.error("unrecognized arguments: " + " ".join(extras))
        if stop_after_parse:
            raise Parsed(ns)
        return ns

    P.error, P.exit, P._get_value, P._check_value = error, exit, get_value, check_value
    P._get_option_tuples = lambda self, option_string: []
    P.parse_known_args, P.parse_args = parse_known_args, parse_args
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for k, v in saved.items():
            setattr(P, k, v)


@functools.lru_cache(maxsize=None)
def pyface_parser() -> argparse.ArgumentParser:
    from pyface.cli import build_parser

    return build_parser()


def _subparsers(parser):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return a
    return None


def parse_pyface(argv: list[str], fragment: bool) -> argparse.Namespace | None:
    """argv after ``pyface``: the namespace, None when a placeholder stands for a (sub)command;
    ParseError when the parser refuses it."""
    parser, i = pyface_parser(), 0
    while True:
        sub = _subparsers(parser)
        if sub is None or i >= len(argv) or argv[i].startswith("-"):
            break
        if is_placeholder(argv[i]):
            return None
        if argv[i] not in sub.choices:
            raise ParseError(f"{parser.prog}: no command {argv[i]!r} "
                             f"(choose from {', '.join(sub.choices)})")
        parser, i = sub.choices[argv[i]], i + 1
    with strict_argparse(fragment):
        try:
            return pyface_parser().parse_args(argv)
        except Parsed:          # --help
            return None


def parse_module_main(module: str, argv: list[str], fragment: bool):
    mod = importlib.import_module(module)
    main = getattr(mod, "main", None)
    if main is None:
        return None
    with strict_argparse(fragment, stop_after_parse=True):
        try:
            main(argv)
        except Parsed as p:
            return p.namespace
    raise ParseError(f"python -m {module}: main() returned without parsing arguments")


@functools.lru_cache(maxsize=None)
def source_options(path: Path) -> frozenset[str] | None:
    """The option strings of a script's add_argument calls (None when it has none)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    opts = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument"):
            negatable = any(k.arg == "action" and "BooleanOptional" in ast.unparse(k.value)
                            for k in node.keywords)
            for a in node.args:
                if isinstance(a, ast.Constant) and str(a.value).startswith("-"):
                    opts.add(a.value)
                    if negatable and a.value.startswith("--"):
                        opts.add("--no-" + a.value[2:])
    return frozenset(opts) if opts else None


# --------------------------------------------------------------------------------------------
# config keys
# --------------------------------------------------------------------------------------------

def _registered() -> set[str]:
    from pyface.train.registry import model_names

    return set(model_names())


def check_model_name(name: str | None, argv: list[str], *, baselines=()) -> None:
    if name is None or is_placeholder(name) or name in baselines:
        return
    if name in EXAMPLE_MODELS or "--import" in argv:
        return
    if name not in _registered():
        raise ParseError(f"model {name!r} is not registered ({', '.join(sorted(_registered()))})")


def _key_exists(model_cls, key: str) -> bool:
    """``key`` (``model.x.y``, ``train.steps``, ``stages.s1.model.x``) names a field of the
    experiment config of ``model_cls`` (a field typed Any or dict takes any sub-key)."""
    from pyface.train.config import DataConfig, TrainConfig
    from pyface.train.registry import model_class

    parts = key.split(".")
    if parts[0] == "stages":            # stages.<name>.<key>: a stage, or a stage's stage
        def find(cls, name):
            for stage in getattr(cls, "stages", ()) or ():
                sub = model_class(stage.model)
                if stage.name == name:
                    return sub
                found = find(sub, name)
                if found is not None:
                    return found
            return None

        stage_cls = find(model_cls, parts[1]) if len(parts) > 2 else None
        return stage_cls is not None and _key_exists(stage_cls, ".".join(parts[2:]))
    tp = {"model": model_cls.Config, "data": DataConfig, "train": TrainConfig}.get(parts[0])
    if tp is None:
        return False
    for p in parts[1:]:
        while typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if not dataclasses.is_dataclass(tp):
            return tp is typing.Any or typing.get_origin(tp) is dict or tp is dict
        hints = typing.get_type_hints(tp)
        if p not in hints:
            return False
        tp = hints[p]
    return True


def check_sets(model: str, preset: str | None, sets: list[str]) -> None:
    """Build the config of ``model`` as ``pyface train`` does (ConfigError -> ParseError)."""
    from pyface.train.config import ConfigError, build_experiment
    from pyface.train.registry import model_class
    from pyface.train.stages import check_stage_overrides, own_overrides, prepare_stages

    cls = model_class(model)
    concrete = []
    for item in sets:
        key, sep, value = item.partition("=")
        if any(is_placeholder(p) for p in key.split(".")) or is_placeholder(key):
            continue
        if is_placeholder(value) or not sep:
            if not _key_exists(cls, key):
                raise ParseError(f"--set {item}: no such key in the config of {model!r}")
            continue
        if key.strip() == "train.run_dir":     # no run folder of this machine is read
            item = "train.run_dir=runs/checked"
        concrete.append(item)
    if preset is not None and is_placeholder(preset):
        preset = None
    try:
        check_stage_overrides(model, cls, concrete)
        cfg = build_experiment(model, cls.Config, overrides=own_overrides(concrete),
                               defaults=getattr(cls, "recipe", {}), preset=preset)
        if getattr(cls, "stages", ()):
            prepare_stages(cls, cfg, overrides=concrete, dry_run=True)
    except (ConfigError, KeyError, ValueError) as exc:
        raise ParseError(f"{model}: {exc}") from None


def check_synth_sets(sets: list[str]) -> None:
    from pyface.data.synthetic import SynthConfig

    fields = {f.name for f in dataclasses.fields(SynthConfig)}
    for item in sets:
        key = item.partition("=")[0]
        if not is_placeholder(key) and key not in fields:
            raise ParseError(f"--set {item}: not a SynthConfig field")


# --------------------------------------------------------------------------------------------
# checking one command
# --------------------------------------------------------------------------------------------

def check_command(argv: list[str], fragment: bool) -> None:
    """ParseError naming what is wrong with ``argv`` (a command as found in the docs)."""
    variants, dots = expand(argv, fragment)
    for v in variants:
        _check_one(v, fragment or dots)


def _module_after(argv: list[str]) -> tuple[str, list[str]] | None:
    if "-m" in argv:
        i = argv.index("-m")
        if i + 1 < len(argv):
            return argv[i + 1], argv[i + 2:]
    return None


def _check_one(argv: list[str], fragment: bool) -> None:
    word = argv[0]
    if word == "pyface":
        return _check_pyface(argv[1:], fragment)
    if word == "pytest":
        return _check_pytest(argv[1:])
    if word == "torchrun":
        mod = _module_after(argv)
        if mod is None:
            return                              # `torchrun --signals-to-handle=...` alone
        return _check_module(mod[0], mod[1], fragment)
    # python
    rest = argv[1:]
    while rest and rest[0] in ("-u", "-X", "-W", "-B", "-O"):
        rest = rest[2:] if rest[0] in ("-X", "-W") else rest[1:]
    if not rest:
        return
    if rest[0] == "-m" and len(rest) > 1:
        return _check_module(rest[1], rest[2:], fragment)
    script = rest[0]
    if not re.match(r"(tools|examples|bench|pyface)/.*\.py$", script) or placeholder_path(script):
        return                      # stdin, -c, a script outside the repository, or a placeholder
    path = ROOT / script
    if not path.is_file():
        raise ParseError(f"{script}: no such file")
    opts = source_options(path)
    if opts is None:
        return
    for a in rest[1:]:
        if a.startswith("--") and a != "--":
            name = a.split("=", 1)[0]
            if name not in opts:
                raise ParseError(f"{script}: no option {name} (it has {', '.join(sorted(opts))})")


def _check_module(module: str, argv: list[str], fragment: bool) -> None:
    if module == "pyface":
        return _check_pyface(argv, fragment)
    if module == "pytest":
        return _check_pytest(argv)
    if not module.startswith("pyface") or placeholder_path(module):
        return
    if importlib.util.find_spec(module) is None:
        raise ParseError(f"python -m {module}: no such module")
    ns = parse_module_main(module, argv, fragment)
    if module == "pyface.bench.train" and ns is not None:
        check_model_name(ns.model, argv)
        if (ns.model is None or ns.model in _registered()) and not ns.imports:
            check_sets(ns.model or "example", ns.preset, ns.overrides)


def _check_pytest(argv: list[str]) -> None:
    for a in argv:
        if a.startswith("-") or not a.startswith("tests/"):
            continue
        path, _, node = a.partition("::")
        files = glob.glob(str(ROOT / path))
        if not files:
            raise ParseError(f"pytest {a}: no such file")
        if node:
            for f in files:
                if not defines(Path(f), node.split("::")[0]):
                    raise ParseError(f"pytest {a}: {path} defines no {node}")


def _check_pyface(argv: list[str], fragment: bool) -> None:
    if argv and argv[0].endswith(":"):
        return                                  # a printed message "pyface train: ..."
    ns = parse_pyface(argv, fragment)
    if ns is None:
        return
    cmd = getattr(ns, "command", None)
    if cmd in ("train", "animate", "eval", "invert"):
        from pyface.eval.cli import BASELINES

        check_model_name(getattr(ns, "model", None), argv, baselines=BASELINES)
        for run in getattr(ns, "runs", None) or []:
            check_model_name(run.split("=", 1)[0], argv, baselines=BASELINES)
    if cmd == "train" and ns.model is not None and ns.model in _registered() and not ns.imports:
        check_sets(ns.model, ns.preset, ns.overrides)
    if cmd == "data" and getattr(ns, "data_command", None) == "cache":
        check_synth_sets(ns.overrides)
    if cmd == "eval" and ns.metrics and not is_placeholder(ns.metrics):
        from pyface.eval.metrics import check_name

        for name in filter(None, ns.metrics.split(",")):
            try:
                check_name(name)
            except ValueError as exc:
                raise ParseError(f"--metrics {ns.metrics}: {exc}") from None
    if cmd == "bench":
        for op in ns.ops:
            if not is_placeholder(op) and op not in bench_names():
                raise ParseError(f"pyface bench: no op or family {op!r} "
                                 f"({', '.join(sorted(bench_names()))})")


@functools.lru_cache(maxsize=None)
def bench_names() -> frozenset[str]:
    """The op families of ``pyface bench`` and the ops of their cases (both sizes)."""
    import torch

    from pyface.bench.cli import _families

    names = set(_families())
    for fam in _families():
        mod = importlib.import_module(f"pyface.bench.ops.{fam}")
        for size in ("small", "full"):
            names.update(c.op for c in mod.cases(torch.device("cpu"), size))
    return frozenset(names)


# --------------------------------------------------------------------------------------------
# code references
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def _names(body) -> dict[str, ast.AST]:
    out: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        out[n.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                out[(a.asname or a.name).split(".")[0]] = node
        elif isinstance(node, (ast.If, ast.Try)):
            for part in (node.body, getattr(node, "orelse", []), getattr(node, "finalbody", []),
                         *[h.body for h in getattr(node, "handlers", [])]):
                out.update(_names(part))
    return out


def defines(path: Path, symbol: str) -> bool:
    """``symbol`` (``Name``, ``Class.attr``, or a glob such as ``test_plugin_*``) is defined
    at the top of the file ``path`` (a def, class, assignment or import)."""
    import fnmatch

    body = _tree(path).body
    for part in symbol.split("."):
        if body is None:
            return False
        names = _names(body)
        hits = fnmatch.filter(names, part) if "*" in part else [part] if part in names else []
        if not hits:
            return False
        node = names[hits[0]]
        body = node.body if isinstance(node, ast.ClassDef) else None
    return True


def _module_file(dotted: str) -> Path | None:
    parts = dotted.split(".")
    if parts[:2] == ["pyface", "kernels"]:      # setup.py's package_dir: kernels/ is pyface.kernels
        parts = parts[1:]
    p = ROOT.joinpath(*parts)
    if p.with_suffix(".py").is_file():
        return p.with_suffix(".py")
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    return None


def resolve_dotted(name: str) -> bool:
    """``pyface.a.b.C.d``: the longest module prefix exists and defines the rest (read with
    ast; a name the source does not show, e.g. a lazy attribute, by importing the module)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        f = _module_file(".".join(parts[:i]))
        if f is None:
            continue
        rest = parts[i:]
        if not rest or defines(f, ".".join(rest)):
            return True
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            for r in rest:
                obj = getattr(obj, r)
            return True
        except Exception:
            return False
    return False


FILE_REF = re.compile(
    r"(?<![\w/.<-])((?:pyface|tools|tests|bench|examples|csrc|kernels)/[\w./*{},<>-]*[\w}*/])"
    r"(?:(::|:)([A-Za-z_*][\w.*]*))?")
DOTTED = re.compile(r"(?<![\w./<-])(pyface(?:\.[A-Za-z_][A-Za-z0-9_]*)+)(?![\w<])")

# dotted names that are not Python objects of the source tree -> why
NOT_OBJECTS = {
    "pyface.datasets": "an entry-point group (docs/train.md, Plugins), not a module",
    "pyface._C": "the compiled extension: present only after the build",
}


def _brace_expand(path: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [x for alt in m.group(1).split(",")
            for x in _brace_expand(path[:m.start()] + alt + path[m.end():])]


def _names_example(ref: str) -> bool:
    """A reference to a guide's made-up model or op (``csrc/foo/foo_cpu.cpp``,
    ``pyface.models.mymodel``)."""
    return any(w in EXAMPLE_MODELS for w in re.split(r"[/._-]+", ref))


def check_file_ref(path: str, symbol: str | None) -> str | None:
    """Why the reference ``path[:symbol]`` is broken, or None. A path holding ``<...>`` or an
    UPPER-CASE placeholder, or naming one of EXAMPLE_MODELS, is not looked for."""
    if placeholder_path(path) or _names_example(path):
        return None
    for p in _brace_expand(path):
        files = [Path(f) for f in glob.glob(str(ROOT / p))]
        if not files:
            return f"{p}: no such file"
        if symbol and p.endswith(".py"):
            sym = symbol.split("::")[0].rstrip(".")
            if not any(defines(f, sym) for f in files if f.suffix == ".py"):
                return f"{p} defines no {sym}"
    return None


# --------------------------------------------------------------------------------------------
# collection
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def all_snippets() -> tuple[Snippet, ...]:
    return tuple(s for f in doc_files() for s in snippets(f))


def _allowed(snippet: Snippet, used: set | None = None) -> bool:
    for (f, sub), _why in ALLOWED.items():
        if f == snippet.file and sub in snippet.text:
            if used is not None:
                used.add((f, sub))
            return True
    return False


def command_failures(files=None, used: set | None = None) -> list[str]:
    out = []
    for s in all_snippets():
        if files is not None and s.file not in files:
            continue
        for argv in commands(s.text):
            try:
                check_command(argv, s.fragment)
            except (ParseError, ImportError) as exc:
                if _allowed(s, used):
                    continue
                out.append(f"{s.file}:{s.line}: {' '.join(argv)}\n    {exc}")
    return out


def python_import_failures(text: str, rel: str) -> list[str]:
    """``import pyface.x`` / ``from pyface.x import Y`` of the ``python`` blocks of the page
    ``rel`` (its ``text``) resolve (a block that is not valid Python is reported too)."""
    import textwrap

    out = []
    for kind, lang, lines in _blocks(text):
        if kind != "fence" or lang != "python" or not lines:
            continue
        try:
            tree = ast.parse(textwrap.dedent("\n".join(line for _, line in lines)))
        except SyntaxError as exc:
            out.append(f"{rel}:{lines[0][0] + (exc.lineno or 1) - 1}: not valid Python: {exc.msg}")
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "pyface":
                names = [f"{node.module}.{a.name}" for a in node.names if a.name != "*"]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.split(".")[0] == "pyface"]
            else:
                continue
            for name in names:
                if not _names_example(name) and not resolve_dotted(name):
                    out.append(f"{rel}:{lines[0][0] + node.lineno - 1}: import {name}: "
                               "no such module or attribute")
    return out


CALL = re.compile(r"(?<![\w.])(pyface(?:\.[A-Za-z_]\w*)+)\(([^()]*(?:\([^()]*\)[^()]*)*)\)")


def call_failures(text: str) -> list[str]:
    """The keyword arguments of the calls ``pyface.x.f(..., name=...)`` of a code span are
    parameters of ``f`` (imported; a callable taking ``**kwargs`` takes any)."""
    import inspect

    out = []
    for m in CALL.finditer(text):
        depth, top, word = 0, [], ""
        for c in m.group(2):                    # the keywords at the call's own level
            depth += c in "([{" and 1 or -(c in ")]}")
            if depth == 0 and c == "=" and re.fullmatch(r"[A-Za-z_]\w*", word.strip()):
                top.append(word.strip())
            word = "" if depth == 0 and c in ",(" else word + c
        if not top or _names_example(m.group(1)):
            continue
        parts, obj = m.group(1).split("."), None
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            try:
                for r in parts[i:]:
                    obj = getattr(obj, r)
            except AttributeError:
                obj = None
            break
        if obj is None:
            continue                            # reported by the dotted-name check
        try:
            params = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            continue
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            continue
        bad = [k for k in top if k not in params]
        if bad:
            out.append(f"{m.group(1)}(): no parameter {', '.join(bad)} "
                       f"(it takes {', '.join(params)})")
    return out


def reference_failures(used: set | None = None) -> list[str]:
    out = []
    for path in doc_files():
        rel = path.relative_to(ROOT).as_posix()
        out += python_import_failures(path.read_text(encoding="utf-8"), rel)
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for m in FILE_REF.finditer(line):
                why = check_file_ref(m.group(1), m.group(3))
                if why:
                    out.append(f"{rel}:{i}: {m.group(0)}: {why}")
            for m in DOTTED.finditer(line):
                name = m.group(1)
                if name in NOT_OBJECTS:
                    if used is not None:
                        used.add(name)
                    continue
                if not _names_example(name) and not resolve_dotted(name):
                    out.append(f"{rel}:{i}: {name}: no such module or attribute")
    for s in all_snippets():
        if s.fragment:
            out += [f"{s.file}:{s.line}: {why}" for why in call_failures(s.text)]
            for m in TEST_NAME.finditer(s.text):
                if not any(n.startswith(m.group(1)) for n in defined_test_names()):
                    out.append(f"{s.file}:{s.line}: {m.group(1)}: no such test under tests/ "
                               "or bench/")
    return out


TEST_NAME = re.compile(r"(?<![\w/:.<-])(test_\w+)(?![\w.]*\.py)")


@functools.lru_cache(maxsize=None)
def defined_test_names() -> frozenset[str]:
    """The functions and classes of tests/ and bench/ (a test named alone in a code span, or
    the prefix of a group of them, ``test_plugin_*``)."""
    names = set()
    for f in [*(ROOT / "tests").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]:
        names.update(n.name for n in ast.walk(_tree(f))
                     if isinstance(n, (ast.FunctionDef, ast.ClassDef)))
    return frozenset(names)


SETTING = re.compile(r"(?:--set )?((?:model|train|data|stages)\.[\w.<>-]+)=\S*")


def _family(model: str) -> list[str]:
    """``model`` and, recursively, the models of its stages."""
    from pyface.train.registry import model_class

    out = [model]
    for stage in getattr(model_class(model), "stages", ()) or ():
        out += [m for m in _family(stage.model) if m not in out]
    return out


def setting_failures(used: set | None = None) -> list[str]:
    """Code spans that are one setting, ``key=value`` or ``--set key=value``: the key exists in
    the config of the page's model, one of its stages or a model with it as a stage
    (docs/models/<model>*.md), elsewhere
    of some registered model (the value is not checked: the model is not named)."""
    from pyface.train.registry import model_class

    out = []
    for s in all_snippets():
        m = SETTING.fullmatch(s.text) if s.fragment else None
        if not m or any(is_placeholder(p) for p in m.group(1).split(".")):
            continue
        page = re.fullmatch(r"docs/models/([a-z0-9]+)(?:-measured)?\.md", s.file)
        if page:                        # the page's model, its stages, the models built on it
            models = _family(page.group(1))
            models += [x for x in sorted(_registered())
                       if page.group(1) in _family(x) and x not in models]
        else:
            models = sorted(_registered())
        if any(_key_exists(model_class(x), m.group(1)) for x in models):
            continue
        if _allowed(s, used):
            continue
        out.append(f"{s.file}:{s.line}: {s.text}: no such key in the config of "
                   f"{' or '.join(models) if page else 'any registered model'}")
    return out


@pytest.fixture(autouse=True)
def _in_empty_dir(tmp_path, monkeypatch):
    # run folders named by the commands (runs/x) are looked up relative to an empty folder
    monkeypatch.chdir(tmp_path)


def test_docs_commands_parse_and_their_config_keys_exist():
    failures = command_failures()
    assert not failures, f"{len(failures)} documented command(s) do not match the code:\n" + \
        "\n".join(failures)


def test_docs_settings_name_config_keys():
    used: set = set()
    failures = setting_failures(used)
    assert not failures, f"{len(failures)} setting(s) name no config key:\n" + "\n".join(failures)


def test_allowed_entries_are_used():
    used: set = set()
    command_failures(used=used)
    setting_failures(used)
    stale = set(ALLOWED) - used
    assert not stale, f"ALLOWED entries that excuse nothing: {sorted(stale)}"


def test_docs_code_references_exist():
    used: set = set()
    failures = reference_failures(used)
    assert not failures, f"{len(failures)} broken code reference(s):\n" + "\n".join(failures)
    assert set(NOT_OBJECTS) <= used, f"unused NOT_OBJECTS: {sorted(set(NOT_OBJECTS) - used)}"


# --------------------------------------------------------------------------------------------
# the checker itself: what it must refuse and what it must accept
# --------------------------------------------------------------------------------------------

def _problems(text: str, *, fragment: bool = False) -> list[str]:
    out = []
    found = commands(text)
    assert found, f"no command found in {text!r}"
    for argv in found:
        try:
            check_command(argv, fragment)
        except (ParseError, ImportError) as exc:
            out.append(str(exc))
    return out


@pytest.mark.parametrize("text, needle", [
    ("pyface train example --stepz 3", "--stepz"),                       # unknown option
    ("pyface data synth --out d --ident 4", "--ident"),                  # an abbreviation
    ("pyface trian example", "trian"),                                   # unknown command
    ("pyface data synthesize --out d", "synthesize"),                    # unknown subcommand
    ("pyface bench render --size huge", "huge"),                         # a value not in choices
    ("pyface bench render --size small|huge", "huge"),                   # one alternative wrong
    ("pyface bench rendr --device cpu", "rendr"),                        # unknown op family
    ("pyface eval copy-source --data d --metrics psnr,ssimm", "ssimm"),  # unknown metric
    ("pyface data synth --out d --frames many", "many"),                 # a value of wrong type
    ("pyface train example --set train.stepz=3", "train.stepz"),         # unknown config key
    ("pyface train example --set train.steps=N --set train.stepz=N", "train.stepz"),
    ("pyface train example --set train.steps=lots", "train.steps"),      # wrong value type
    ("pyface train goha --preset tiny --set stages.s9.model.x=1", "stages.s9"),
    ("pyface train goha --set stages.s1.model.mouth_weigth=W", "mouth_weigth"),
    ("pyface train example --preset huge", "huge"),                      # unknown preset
    ("pyface train exampel --preset tiny", "exampel"),                   # unregistered model
    ("pyface eval --runs exampel=runs/x --data d", "exampel"),
    ("pyface data cache --build 64 --set zoomm=0.2", "zoomm"),
    ("time OMP_NUM_THREADS=1 pyface train example --sett x=1", "--sett"),
    ("torchrun --nproc_per_node=2 -m pyface train example --sett x=1", "--sett"),
    ("for m in example eg3d; do pyface train $m --preset tinyy; done", "tinyy"),
    ("python -m pyface.bench.train example --stepz 3", "--stepz"),
    ("python -m pyface.bench.train --set train.stepz=3", "train.stepz"),  # the example model
    ("python -m pyface.no_such_module --x", "no such module"),
    ("python tools/no_such_tool.py --json x", "no such file"),
    ("python tools/bench_goha_lift.py --pathz fused", "--pathz"),
    ("python -m pytest -q tests/no_such_test.py", "no such file"),
    ("python -m pytest -q tests/test_docs_links.py::test_no_such_test", "test_no_such_test"),
    ("pyface animate example --source face.png", "--checkpoint"),        # complete: required
])
def test_checker_refuses_a_wrong_command(text, needle):
    problems = _problems(text)
    assert problems and any(needle in p for p in problems), problems


@pytest.mark.parametrize("text, fragment", [
    ("pyface animate MODEL --checkpoint RUN --source IMG_OR_VIDEO_FOLDER [--driving DIR]", False),
    ("pyface data synth --out DIR --frames N --resolution RES", False),  # placeholder ints
    ("pyface data prepare clips/ --out DIR --resolution RES", False),    # placeholder choice
    ("pyface train example --set train.steps=N --set train.run_dir=runs/x", False),
    ("pyface train goha --preset tiny --set stages.s1.model.mouth_weight=W", False),
    ("pyface train stage2 --preset P --set train.run_dir=RUN", False),   # EXAMPLE_MODELS
    ("pyface train goha_s1 --preset tiny --set train.lr_schedule.kind=... --set ...", False),
    ("pyface COMMAND --help", False),
    ("pyface data SUBCOMMAND --anything", False),
    ("pyface bench [OP ...] [--device cpu|cuda] [--size small|full]", False),
    ("pyface convert {eg3d,vgg19,arcface} SRC OUT", False),
    ("pyface invert eg3d IMAGE --checkpoint ... --camera LABEL_OR_DIR [--space w|w+]", False),
    ("pyface animate --weights NAME=PATH", True),                        # a span: a fragment
    ("pyface data bench --root", True),                                  # names the option
    ("pyface train: model 'mine' (MyModel): does not define step(...)", False),   # a message
    ("cd examples/plugin; pyface train toyplane --import toyplane --preset tiny", False),
    ("python -m pyface.bench.train [--steps N] [--json PATH]", True),
    ("python tools/bench_goha_lift.py --paths fused,reference --json x.json", False),
    ("python tools/X.py --anything", False),                            # a placeholder tool
    ("python -m pyface.MODULE --anything", False),
])
def test_checker_accepts_documented_forms(text, fragment):
    assert _problems(text, fragment=fragment) == []


def test_snippets_joins_continuations_and_spans_over_lines(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("Run `pyface train example\n--preset tiny` here.\n\n```bash\n"
                   "pyface data synth --out d \\\n    --frames 8   # a comment\n```\n"
                   "```python\npyface train nothing_checked_in_python\n```\n", encoding="utf-8")
    old = globals()["ROOT"]
    globals()["ROOT"] = tmp_path
    try:
        found = [(s.line, s.fragment, commands(s.text)) for s in snippets(doc)]
    finally:
        globals()["ROOT"] = old
    assert (1, True, [["pyface", "train", "example", "--preset", "tiny"]]) in found
    assert (5, False, [["pyface", "data", "synth", "--out", "d", "--frames", "8"]]) in found
    assert not any("nothing_checked_in_python" in str(f) for f in found)


@pytest.mark.parametrize("ref, ok", [
    ("pyface/cli.py:build_parser", True),
    ("pyface/cli.py:build_parsers", False),
    ("tests/test_docs_links.py::test_relative_links_*", True),
    ("tests/test_docs_links.py::test_nothing_of_the_kind", False),
    ("tools/no_such_tool.py", False),
    ("pyface.cli.build_parser", True),
    ("pyface.cli.no_such_function", False),
    ("pyface.no_such_module", False),
    ("from pyface.cli import build_parser, plural", True),
    ("from pyface.cli import build_parserz", False),
    ("import pyface.no_such_module", False),
    ("call pyface.cli.plural(2, word='frame')", True),
    ("call pyface.cli.plural(2, wordz='frame')", False),
    ("call pyface.cli.plural(len(x), word=f(a=1))", True),   # a nested call's keyword
    ("span test_exact_resume_matches_uninterrupted", True),
    ("span test_exact_resume_matches_nothing", False),
])
def test_checker_of_code_references(ref, ok):
    if ref.startswith("span "):
        names = [m.group(1) for m in TEST_NAME.finditer(ref[5:])]
        assert names and all(any(n.startswith(x) for n in defined_test_names())
                             for x in names) is ok
    elif ref.startswith("call "):
        assert (call_failures(ref[5:]) == []) is ok
    elif ref.startswith(("from ", "import ")):
        assert (python_import_failures(f"```python\n{ref}\n```\n", "x.md") == []) is ok
    elif ref.startswith("pyface."):
        assert resolve_dotted(ref) is ok
    else:
        m = FILE_REF.fullmatch(ref)
        assert m, ref
        assert (check_file_ref(m.group(1), m.group(3)) is None) is ok
