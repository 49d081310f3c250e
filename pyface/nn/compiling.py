"""Opt-in ``torch.compile`` of a model's heavy submodules, in place.

A model or pipeline names the submodules worth compiling (a generator's backbone, a renderer's
decoder, a super-resolution network: the modules most of the time is spent in) and
:func:`compile_modules` compiles each with :meth:`torch.nn.Module.compile`. That keeps parameter
names, ``state_dict`` keys, EMA copies and checkpoints exactly as without compilation; only the
modules' ``forward`` calls go through TorchDynamo. pyface's fused ops are registered custom ops
with fake kernels, so they stay in the graph instead of breaking it.

One string selects what is compiled and how (``--compile`` on the command line,
``train.compile`` in a training config)::

    off                          no compilation (the default)
    default                      torch.compile with the Inductor backend, its default mode
    reduce-overhead              Inductor, CUDA graphs (GPU only; on CPU the same as default)
    max-autotune                 Inductor, autotuned kernels (+ CUDA graphs)
    max-autotune-no-cudagraphs   Inductor, autotuned kernels
    aot_eager                    graph capture and AOTAutograd, no code generation (debugging)
    eager                        graph capture only (debugging: finds graph breaks quickly)

The first calls compile (seconds to minutes); later calls with new input shapes recompile.
Inductor on CPU needs a C++ compiler (``g++``/``clang++``, or the one named by ``CXX``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

#: Inductor modes accepted by :func:`parse_compile`.
INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: Debugging backends accepted by :func:`parse_compile` (no code generation).
DEBUG_BACKENDS = ("aot_eager", "eager")
#: Every value :func:`parse_compile` accepts, "off" first.
COMPILE_CHOICES = ("off", *INDUCTOR_MODES, *DEBUG_BACKENDS)

_OFF = {"off", "none", "false", "no", "0", ""}
_ON = {"on", "true", "yes", "1"}


@dataclass(frozen=True)
class CompileOptions:
    """How :func:`compile_modules` calls :meth:`torch.nn.Module.compile`."""

    backend: str = "inductor"
    mode: str | None = "default"
    dynamic: bool | None = None
    fullgraph: bool = False

    @property
    def choice(self) -> str:
        """The :data:`COMPILE_CHOICES` value these options stand for (``"default"``,
        ``"aot_eager"``, ...), as configs and reports record it."""
        return self.mode if self.backend == "inductor" else self.backend

    def describe(self) -> str:
        """A short human-readable form, e.g. ``inductor (default)`` or ``aot_eager``."""
        return f"{self.backend} ({self.mode})" if self.backend == "inductor" else self.backend


def parse_compile(value, *, what: str = "compile") -> CompileOptions | None:
    """The :class:`CompileOptions` a ``--compile`` / ``train.compile`` value asks for, or None
    for no compilation.

    value: None, a bool, or one of :data:`COMPILE_CHOICES` (``on`` / ``true`` mean
    ``default``; ``none`` / ``false`` / ``""`` mean ``off``). what: the option's name, for the
    error message.
    """
    if value is None or value is False:
        return None
    if value is True:
        return CompileOptions()
    if not isinstance(value, str):
        raise ValueError(f"{what}: expected one of {', '.join(COMPILE_CHOICES)} (or a bool), "
                         f"got {value!r} of type {type(value).__name__}")
    v = value.strip().lower()
    if v in _OFF:
        return None
    if v in _ON:
        return CompileOptions()
    if v in INDUCTOR_MODES:
        return CompileOptions(mode=v)
    if v in DEBUG_BACKENDS:
        return CompileOptions(backend=v, mode=None)
    raise ValueError(f"{what}: expected one of {', '.join(COMPILE_CHOICES)}, got {value!r}")


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` was compiled in place (:meth:`torch.nn.Module.compile`)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def compile_modules(root: nn.Module, names: Sequence[str],
                    options: CompileOptions | str | bool | None) -> list[str]:
    """Compiles the submodules ``names`` of ``root`` in place and returns the names compiled.

    root: the model. names: dotted submodule paths (``"backbone"``, ``"renderer.decoder"``;
    ``""`` is ``root`` itself); a name whose attribute is None (an optional part the
    configuration left out) is skipped, a name that does not exist is an error naming the
    module and its children. options: a :class:`CompileOptions`, or a value for
    :func:`parse_compile`; None / ``"off"`` compiles nothing. A module compiled already is left
    as it is (and not returned). A module whose ``forward`` is torch's own (``nn.Sequential``,
    ``nn.Conv2d``, a subclass that keeps their forward) is an error: ``Module.compile`` leaves
    such a module uncompiled without a word, so name the module that calls it.
    """
    if not isinstance(options, CompileOptions):
        options = parse_compile(options)
    if options is None:
        return []
    if isinstance(names, str):
        raise TypeError(f"names: expected a sequence of submodule names, got the string {names!r}")
    done = []
    for name in names:
        module = root
        for part in [p for p in name.split(".") if p]:
            if not hasattr(module, part):
                children = ", ".join(n for n, _ in module.named_children()) or "none"
                raise ValueError(f"compile: {type(root).__name__} has no submodule {name!r} "
                                 f"({type(module).__name__} has no {part!r}; its children: "
                                 f"{children})")
            module = getattr(module, part)
            if module is None:
                break
        if module is None:
            continue
        if not isinstance(module, nn.Module):
            raise ValueError(f"compile: {type(root).__name__}.{name} is a "
                             f"{type(module).__name__}, not an nn.Module")
        forward_from = getattr(type(module).forward, "__module__", "") or ""
        if forward_from == "torch" or forward_from.startswith("torch."):
            # Module.compile wraps the module's call, and TorchDynamo does not trace a call whose
            # forward is torch's own code: the module would run uncompiled without a word
            raise ValueError(f"compile: {type(root).__name__}.{name or '(the model)'} is a "
                             f"{type(module).__name__}, whose forward is torch's own "
                             f"({forward_from}); Module.compile does not trace it. Name the "
                             f"module that calls it instead")
        if is_compiled(module):
            continue
        kwargs = {"backend": options.backend, "dynamic": options.dynamic,
                  "fullgraph": options.fullgraph}
        if options.backend == "inductor":
            kwargs["mode"] = options.mode
        module.compile(**kwargs)
        done.append(name)
    return done


def generator_kwargs(generator: torch.Generator | None) -> dict:
    """``{"generator": generator}`` for ``torch.rand`` / ``randn``, or ``{}`` when it is None: the
    same numbers either way, but under torch.compile an explicit ``generator=None`` fails to trace
    once the input shapes vary."""
    return {} if generator is None else {"generator": generator}


def reset_compiled() -> None:
    """Drops every compiled graph TorchDynamo cached (``torch._dynamo.reset()``); the next call
    of a compiled module compiles again. Useful between benchmarks."""
    torch._dynamo.reset()
