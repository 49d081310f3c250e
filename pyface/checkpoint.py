"""Checkpoints that are safe by construction.

A pyface checkpoint is a folder::

    ckpt-000100/
        tensors.safetensors   every tensor (module weights, EMA copies, optimizer moments, RNG)
        meta.json             format/version, step, config, optimizer scalars, Python RNG state,
                              and the SHA-256 of tensors.safetensors

Loading never executes code: tensors come from safetensors, everything else from JSON. Third-party
weight files are read with :func:`load_weights_file` (safetensors, or ``torch.load`` with
``weights_only=True``; never a full unpickle; refused on torch < 2.6, whose weights-only loader
a crafted file can make execute code: :func:`check_torch_load_safe`).

Writes are atomic: the folder is written under a temporary name, flushed to disk and renamed, and
``latest`` (a one-line text file naming the newest checkpoint) is replaced atomically afterwards.
A crash mid-write leaves the previous checkpoint and ``latest`` untouched.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Mapping
from typing import Any

import torch

FORMAT = "pyface-checkpoint"
FORMAT_VERSION = 1
TENSORS_FILE = "tensors.safetensors"
META_FILE = "meta.json"
LATEST_FILE = "latest"
_CKPT_RE = re.compile(r"^ckpt-(\d+)$")

__all__ = ["FORMAT", "FORMAT_VERSION", "TENSORS_FILE", "META_FILE", "LATEST_FILE",
           "CheckpointError", "check_replaceable", "check_weights_replaceable", "save_folder",
           "not_a_folder_hint", "read_meta", "load_folder", "checkpoint_path", "list_checkpoints",
           "latest_checkpoint", "mark_latest", "remove_partial_writes", "prune_checkpoints",
           "optimizer_to_flat", "optimizer_from_flat", "check_state_dict", "load_module_state",
           "sub_state", "save_weights", "load_weights", "load_weights_file",
           "describe_weights_file", "check_torch_load_safe"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match what it is loaded into."""


# --------------------------------------------------------------------------------------------
# Low level: one folder = tensors + JSON
# --------------------------------------------------------------------------------------------

def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; storages shared between entries are cloned (safetensors
    refuses aliasing)."""
    out, seen = {}, set()
    for k, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"checkpoint tensor {k!r}: expected a torch.Tensor, got "
                            f"{type(t).__name__}")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and key in seen:
            t = t.clone()
        elif t.numel():
            seen.add(key)
        out[k] = t
    return out


def check_replaceable(path: str) -> None:
    """Raise :class:`CheckpointError` unless ``path`` may become a checkpoint folder: it does not
    exist, is an empty folder, or is a pyface checkpoint folder (``meta.json`` of this format),
    which :func:`save_folder` replaces. Anything else (a file, a folder of other files) is never
    replaced, so a mistyped output path cannot delete a user's files. An empty path is refused
    (``os.path.abspath("")`` is the working directory), and so is a symbolic link: the new folder
    is renamed into the path's place, which would replace the link rather than the folder it
    points to (whether the folder or the link was meant is the user's to say)."""
    if not isinstance(path, (str, os.PathLike)) or not str(os.fspath(path)).strip():
        raise CheckpointError(f"expected a folder path, got {path!r} (an empty path would name "
                              "the working directory)")
    if os.path.islink(path):
        target = os.path.realpath(path)
        raise CheckpointError(
            f"{path}: a symbolic link (to {target}{'' if os.path.exists(target) else ', absent'})"
            "; pyface writes the new folder and renames it into the path's place, which would "
            f"replace the link, not the folder it points to: give {target} itself to replace "
            "that folder, or remove the link to write a new folder in its place")
    if not os.path.lexists(path):
        parent = os.path.dirname(os.path.abspath(path))
        while parent and not os.path.exists(parent):   # the first existing ancestor
            parent = os.path.dirname(parent)
        if parent and not os.path.isdir(parent):
            raise CheckpointError(f"{path}: cannot create the folder: {parent} is a file")
        return
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: exists and is not a folder; pyface writes a checkpoint "
                              "folder there only if the path is free, an empty folder or a pyface "
                              "checkpoint folder: choose another output path")
    if not os.listdir(path):
        return
    try:
        with open(os.path.join(path, META_FILE)) as f:
            ours = json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise CheckpointError(f"{path}: the folder holds other files (it is not a pyface "
                              f"checkpoint folder with {META_FILE} and {TENSORS_FILE}); pyface "
                              "replaces only its own folders: choose a new or empty output folder")


def save_folder(path: str, tensors: Mapping[str, torch.Tensor], meta: dict) -> str:
    """Atomically write ``path/`` with ``tensors.safetensors`` and ``meta.json``.

    An existing pyface checkpoint folder at ``path`` is replaced only after the new one is
    complete on disk; any other existing file or non-empty folder is refused
    (:func:`check_replaceable`), never overwritten.
    """
    from safetensors.torch import save_file

    check_replaceable(path)
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        tfile = os.path.join(tmp, TENSORS_FILE)
        save_file(_prepare_tensors(tensors), tfile)
        with open(tfile, "rb+") as f:
            os.fsync(f.fileno())
        meta = dict(meta)
        meta.update(format=FORMAT, format_version=FORMAT_VERSION,
                    tensors_sha256=_sha256(tfile), saved_at=time.time())
        mfile = os.path.join(tmp, META_FILE)
        with open(mfile, "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
        if os.path.exists(path):
            old = f"{path}.old-{os.getpid()}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def not_a_folder_hint(path: str) -> str:
    """The end of a "not a checkpoint folder" message: the path does not exist, or is a file
    (third-party weights convert with ``pyface convert``), or nothing."""
    if not os.path.exists(path):
        return "; it does not exist"
    if os.path.isfile(path):
        return ("; it is a file: third-party weights (an EG3D .pkl, a released .pth) convert to a "
                "weights folder with `pyface convert FORMAT FILE OUT` (see `pyface convert "
                "--help`)")
    return ""


# the fields of meta.json that loaders read, and the JSON types save_folder's callers write
# (None: absent); a hand-edited file that breaks them is refused by read_meta
_META_TYPES = {"step": int, "world_size": int, "kind": str, "model": str, "tensors_sha256": str,
               "config": dict, "experiment": dict, "optimizers": dict, "ema_modules": list}
_EXPERIMENT_TYPES = {"model": str, "model_config": dict, "data": dict, "train": dict}
_JSON_NAMES = {int: "an integer", str: "a string", dict: "an object", list: "a list"}


def _meta_field_error(meta: dict) -> str | None:
    """What is wrong with the type of a field of ``meta`` that loaders read, or None."""
    def wrong(key, value, kind):
        if value is None or (isinstance(value, kind) and not isinstance(value, bool)):
            return None
        return f"{key}: expected {_JSON_NAMES[kind]}, got {value!r}"[:200]

    for key, kind in _META_TYPES.items():
        msg = wrong(key, meta.get(key), kind)
        if msg is not None:
            return msg
    if not all(isinstance(m, str) for m in meta.get("ema_modules") or ()):
        return f"ema_modules: expected a list of module names, got {meta['ema_modules']!r}"[:200]
    for key, kind in _EXPERIMENT_TYPES.items():
        msg = wrong(f"experiment.{key}", (meta.get("experiment") or {}).get(key), kind)
        if msg is not None:
            return msg
    return None


def read_meta(path: str) -> dict:
    """The JSON part of a checkpoint folder, validated."""
    mfile = os.path.join(path, META_FILE)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r}: not a folder (expected a pyface checkpoint "
                              f"folder with {TENSORS_FILE} and {META_FILE})"
                              + not_a_folder_hint(path))
    try:
        with open(mfile) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path!r}: {META_FILE} is missing") from None
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path!r}: {META_FILE} is corrupt ({exc})") from None
    if not isinstance(meta, dict):                 # valid JSON, but not what save_folder writes
        raise CheckpointError(f"checkpoint {path!r}: {META_FILE} is corrupt (expected a JSON "
                              f"object, got a {type(meta).__name__})")
    version = meta.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(f"checkpoint {path!r}: {META_FILE} is corrupt (format_version: "
                              f"expected an integer, got {version!r})")
    bad = _meta_field_error(meta)
    if bad is not None:
        raise CheckpointError(f"checkpoint {path!r}: {META_FILE} is corrupt ({bad})")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path!r}: format {meta.get('format')!r}, expected "
                              f"{FORMAT!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path!r}: format version {meta['format_version']} is "
                              f"newer than this pyface ({FORMAT_VERSION}); upgrade pyface")
    return meta


def load_folder(path: str, *, verify: bool = True,
                device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint folder: (tensors, meta). ``verify`` checks the SHA-256 of the tensors."""
    from safetensors.torch import load_file

    meta = read_meta(path)
    tfile = os.path.join(path, TENSORS_FILE)
    if not os.path.isfile(tfile):
        raise CheckpointError(f"checkpoint {path!r}: {TENSORS_FILE} is missing")
    if verify:
        digest = _sha256(tfile)
        if digest != meta.get("tensors_sha256"):
            raise CheckpointError(
                f"checkpoint {path!r}: {TENSORS_FILE} is corrupt (SHA-256 {digest[:16]}... does "
                f"not match {str(meta.get('tensors_sha256'))[:16]}... recorded at save time)")
    try:
        tensors = load_file(tfile, device=str(device))
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"checkpoint {path!r}: cannot read {TENSORS_FILE}: {exc}") from None
    return tensors, meta


# --------------------------------------------------------------------------------------------
# Run folders: ckpt-<step> + latest
# --------------------------------------------------------------------------------------------

def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"ckpt-{step:06d}")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints of a run, oldest first."""
    root = os.path.join(run_dir, "checkpoints")
    out = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            m = _CKPT_RE.match(name)
            if m and os.path.isfile(os.path.join(root, name, META_FILE)):
                out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def latest_checkpoint(run_dir: str) -> str | None:
    """The checkpoint named by ``run_dir/checkpoints/latest``, else the newest complete one."""
    root = os.path.join(run_dir, "checkpoints")
    try:
        with open(os.path.join(root, LATEST_FILE)) as f:
            name = f.read().strip()
        if name and os.path.isfile(os.path.join(root, name, META_FILE)):
            return os.path.join(root, name)
    except OSError:
        pass
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def mark_latest(path: str) -> None:
    root = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(root, f".{LATEST_FILE}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(os.path.basename(path) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, LATEST_FILE))


_PARTIAL_RE = re.compile(r"^(ckpt-\d+\.(tmp|old)|\.latest\.tmp)-(\d+)$")


def remove_partial_writes(run_dir: str) -> list[str]:
    """Delete what a writer killed mid-save left in ``run_dir/checkpoints`` (``ckpt-N.tmp-PID``,
    ``ckpt-N.old-PID``, ``.latest.tmp-PID``; never read as checkpoints); returns the removed
    paths. Whatever the PID: a restarted container often gives the new process the PID of the
    killed one, and this process's own writes are finished when it is called (after a save)."""
    root = os.path.join(run_dir, "checkpoints")
    removed = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            m = _PARTIAL_RE.match(name)
            if m:
                path = os.path.join(root, name)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.remove(path)
                removed.append(path)
    return removed


def prune_checkpoints(run_dir: str, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (never the one ``latest`` names), and the
    partial writes of a killed writer (:func:`remove_partial_writes`)."""
    remove_partial_writes(run_dir)
    if keep <= 0:
        return
    latest = latest_checkpoint(run_dir)
    for _, path in list_checkpoints(run_dir)[:-keep]:
        if latest is None or os.path.abspath(path) != os.path.abspath(latest):
            # renamed first: a deletion cut short leaves a folder that is never listed as a
            # checkpoint (and that the next save removes), not one with meta.json and no tensors
            gone = f"{path}.old-{os.getpid()}"
            try:
                os.rename(path, gone)
            except OSError:
                continue
            shutil.rmtree(gone, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# State dicts: modules and optimizers <-> flat tensors + JSON
# --------------------------------------------------------------------------------------------

def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    raise TypeError(f"cannot store {type(v).__name__} in checkpoint JSON")


def optimizer_to_flat(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict, dict]:
    """(tensors, json) for an optimizer's state_dict; tensors are keyed ``prefix.<idx>.<name>``."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}.{idx}.{name}"] = v
            else:
                scalars.setdefault(str(idx), {})[name] = _jsonable(v)
    return tensors, {"param_groups": _jsonable(sd["param_groups"]), "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor],
                        info: dict, prefix: str, where: str) -> None:
    groups = info["param_groups"]
    own = opt.state_dict()["param_groups"]
    if len(groups) != len(own) or any(len(a["params"]) != len(b["params"])
                                       for a, b in zip(groups, own)):
        raise CheckpointError(
            f"{where}: optimizer {prefix!r} has {[len(g['params']) for g in own]} parameters per "
            f"group, the checkpoint has {[len(g['params']) for g in groups]}")
    state: dict[int, dict] = {}
    plen = len(prefix) + 1
    for k, v in tensors.items():
        if k.startswith(prefix + "."):
            idx, name = k[plen:].split(".", 1)
            state.setdefault(int(idx), {})[name] = v
    for idx, sc in info.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(sc)
    for g in groups:
        for key in ("betas",):
            if isinstance(g.get(key), list):
                g[key] = tuple(g[key])
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{where}: optimizer {prefix!r} state does not fit: {exc}") from None


def check_state_dict(module: torch.nn.Module, state: Mapping[str, torch.Tensor],
                     where: str) -> None:
    """Raise a CheckpointError that lists missing/unexpected keys and shape mismatches."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def few(xs):
            return ", ".join(xs[:6]) + (f" ... ({len(xs)} in all)" if len(xs) > 6 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {few(shapes)}")
        raise CheckpointError(f"{where}: state does not match the model; " + "; ".join(parts))


def load_module_state(module: torch.nn.Module, state: Mapping[str, torch.Tensor],
                      where: str) -> None:
    check_state_dict(module, state, where)
    module.load_state_dict(state, strict=True)


def sub_state(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


# --------------------------------------------------------------------------------------------
# Weights of a single model (converters write these; `save_weights` / `load_weights`)
# --------------------------------------------------------------------------------------------

def check_weights_replaceable(path: str) -> None:
    """:func:`check_replaceable` for a weights folder: an existing pyface folder is replaced only
    when it holds nothing but ``tensors.safetensors`` and ``meta.json`` (a file put there, e.g.
    the very file being converted, would be deleted with it)."""
    check_replaceable(path)
    if os.path.isdir(path):
        other = sorted(set(os.listdir(path)) - {TENSORS_FILE, META_FILE})
        if other and os.path.isfile(os.path.join(path, META_FILE)):
            shown = ", ".join(other[:4]) + (f" ... ({len(other)} in all)" if len(other) > 4
                                             else "")
            raise CheckpointError(f"{path}: a pyface folder that also holds other files "
                                  f"({shown}), which replacing it would delete: move them out "
                                  "or choose a new or empty output folder")


def save_weights(path: str, state: Mapping[str, torch.Tensor], *, kind: str,
                 config: dict | None = None, extra: dict | None = None) -> str:
    """A weights-only checkpoint folder: ``kind`` names what it holds (e.g. ``"eg3d"``). An
    existing folder at ``path`` is replaced only if it is empty or a pyface folder holding
    nothing else (:func:`check_weights_replaceable`)."""
    check_weights_replaceable(path)
    meta = {"kind": kind, "config": config or {}, "extra": extra or {}, "step": None}
    return save_folder(path, state, meta)


def load_weights(path: str, *, kind: str | None = None,
                 device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = load_folder(path, device=device)
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"checkpoint {path!r} holds {meta.get('kind')!r} weights, expected "
                              f"{kind!r}")
    return tensors, meta


_SIGNATURES = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
               (b"GIF8", "a GIF image"), (b"\x1aE\xdf\xa3", "a Matroska / WebM video"),
               (b"RIFF", "a RIFF file (AVI video, WAV audio or WebP image)"),
               (b"%PDF", "a PDF document"), (b"\x1f\x8b", "a gzip archive"),
               (b"\x93NUMPY", "a NumPy .npy array"))
_WEIGHTS_EXPECTED = ("expected a torch.save checkpoint (.pt / .pth / .ckpt / .pkl) or a "
                     ".safetensors file")
# modules a weights-only pickle may name; any other global means the file holds Python objects
_TENSOR_MODULES = ("torch", "collections", "copyreg", "_codecs", "numpy")
_TENSOR_BUILTINS = ("builtins.set", "builtins.frozenset", "builtins.slice", "builtins.complex",
                    "builtins.bytearray")


def _is_safetensors(head: bytes, size: int) -> bool:
    """safetensors layout: an 8-byte little-endian header length, then a JSON header."""
    if len(head) < 10 or head[8:9] != b"{":
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= size - 8


def _pickle_globals(path: str, limit: int = 64) -> tuple[list[str], str | None]:
    """The globals a pickle names (read with :mod:`pickletools`, which executes nothing) and why
    reading stopped early (a truncated or damaged stream), else None."""
    import pickletools

    names, strings = [], []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name == "GLOBAL":
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
                if len(names) >= limit:
                    break
    except Exception as exc:  # noqa: BLE001 - pickletools raises ValueError and others
        return names, str(exc) or type(exc).__name__
    return names, None


def describe_weights_file(path: str) -> str:
    """What a file that is not a readable weights file holds, in words, from its size and first
    bytes (and, for a pickle, the globals it names; nothing in it is run): "an empty file",
    "an MP4 / MOV video", "a truncated or damaged torch.save archive", ..."""
    import zipfile

    size = os.path.getsize(path)
    if size == 0:
        return "an empty file (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(512)
    if head[4:8] == b"ftyp":
        return "an MP4 / MOV video"
    for magic, what in _SIGNATURES:
        if head.startswith(magic):
            return what
    if len(head) > 8 and head[8:9] == b"{" and not _is_safetensors(head, size):
        return (f"a truncated safetensors file (its header alone is "
                f"{int.from_bytes(head[:8], 'little')} bytes, the file {size})")
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            return (f"a truncated or damaged torch.save archive ({size} bytes; the zip directory "
                    "at its end is missing): copy or download it again")
        with zipfile.ZipFile(path) as z:
            if not any(n.endswith("data.pkl") for n in z.namelist()):
                return "a zip archive that is not a torch.save checkpoint (no data.pkl in it)"
        return f"a torch.save archive ({size} bytes)"
    if head[:1] == b"\x80":
        names, stopped = _pickle_globals(path)
        if any(n.startswith(("torch_utils.", "dnnlib.")) for n in names):
            return ("an EG3D-style network pickle (it names torch_utils / dnnlib classes): "
                    "convert it with `pyface convert eg3d`")
        other = [n for n in names
                 if n.split(".")[0] not in _TENSOR_MODULES and n not in _TENSOR_BUILTINS]
        if other:
            return (f"a pickle that holds Python objects, not only tensors (global {other[0]}); "
                    "nothing in it was run")
        if stopped is not None:
            return f"a truncated or damaged pickle ({size} bytes; {stopped})"
        return f"a Python pickle ({size} bytes)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text):
        first = text.strip().splitlines()[0][:40] if text.strip() else ""
        return f"a text file (it starts with {first!r})"
    return f"not a torch.save, pickle or safetensors file (it starts with {head[:8]!r})"


# torch.load(weights_only=True) runs no code only on a torch without these flaws of its
# weights-only unpickler: below 2.6 a crafted file executes code (CVE-2025-32434, shown RCE), so
# pyface refuses; below 2.10 it can corrupt memory, possibly to execute code (CVE-2026-24747),
# so pyface warns
_TORCH_LOAD_REFUSED_BELOW = ((2, 6), "CVE-2025-32434")
_TORCH_LOAD_WARNED_BELOW = ((2, 10), "CVE-2026-24747")


def check_torch_load_safe(what: str) -> None:
    """Raise :class:`CheckpointError` (``what``: the file) when this torch's
    ``torch.load(weights_only=True)`` is known to execute code from a crafted file (torch < 2.6),
    warn when it is known to be open to memory corruption (torch < 2.10)."""
    import warnings

    m = re.match(r"(\d+)\.(\d+)", str(torch.__version__))
    version = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    (refused, cve), (warned, cve2) = _TORCH_LOAD_REFUSED_BELOW, _TORCH_LOAD_WARNED_BELOW
    if version < refused:
        raise CheckpointError(
            f"{what}: torch {torch.__version__}'s torch.load(weights_only=True) can be made to "
            f"execute code by a crafted file ({cve}, fixed in torch {refused[0]}.{refused[1]}); "
            f"pyface reads .pth / .pt / .pkl weights only with torch >= {refused[0]}.{refused[1]}"
            ": upgrade torch (safetensors files and pyface folders load with any torch)")
    if version < warned:
        warnings.warn(f"{what}: read with torch {torch.__version__}'s torch.load(weights_only="
                      f"True), whose weights-only unpickler a crafted file can make corrupt "
                      f"memory ({cve2}, fixed in torch {warned[0]}.{warned[1]}): load only "
                      "files you trust, or upgrade torch", stacklevel=3)


def load_weights_file(path: str, *, map_location: str | torch.device = "cpu") -> Any:
    """Read a third-party weight file without executing code.

    safetensors files (recognised by their content, whatever the name) via safetensors; anything
    else via ``torch.load(weights_only=True)``, which rebuilds tensors and plain containers only.
    A pyface checkpoint folder is read with :func:`load_folder`. Official EG3D pickles need
    ``pyface convert eg3d`` first. A file that does not load raises :class:`CheckpointError`
    saying what it holds (:func:`describe_weights_file`: empty, text, a video, truncated, Python
    objects)."""
    import warnings

    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, META_FILE)):
            raise CheckpointError(f"{path!r}: a folder without {META_FILE}; expected a weights "
                                  "file (.pth / .pt / .safetensors) or a pyface weights folder")
        return load_folder(path, device=map_location)[0]
    if not os.path.isfile(path):
        if os.path.exists(path):
            raise CheckpointError(f"{path!r}: not a regular file (a device, pipe or socket); "
                                  f"{_WEIGHTS_EXPECTED}")
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(16)
    if _is_safetensors(head, os.path.getsize(path)):       # by content, whatever the name
        from safetensors.torch import load_file

        try:
            return load_file(path, device=str(map_location))
        except Exception as exc:  # noqa: BLE001 - safetensors' own error types
            raise CheckpointError(f"{path!r}: not a readable safetensors file ({exc}); "
                                  f"{_WEIGHTS_EXPECTED}") from None
    check_torch_load_safe(repr(path))
    try:
        with warnings.catch_warnings(record=True) as caught:   # shown only if the load works
            warnings.simplefilter("always")
            # a file object, so that torch.load goes by the content, never by the file name
            with open(path, "rb") as f:
                out = torch.load(f, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        refused = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if refused:
            what = (f"it holds Python objects, not only tensors (global {refused.group(1)}); "
                    "nothing in it was run")
        else:
            what = describe_weights_file(path)
        if refused or "Python objects" in what or "EG3D" in what:
            raise CheckpointError(f"{path!r}: torch.load(weights_only=True) refused it: {what} "
                                  "(pyface never unpickles arbitrary objects)") from None
        raise CheckpointError(f"{path!r}: not a readable weights file: {what}; "
                              f"{_WEIGHTS_EXPECTED}") from None
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return out
