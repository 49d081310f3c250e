"""The built-in synthetic dataset behind the registered datasets (``pyface train``).

Every registered talking-head dataset (``synthetic``, ``pairs``, ``cross_identity``,
``motion_windows``, ``clips``, ``multiview``) reads a pyface video root (``mixture`` gives its
``synth`` to all its components, so they read one root). With ``data.path``
unset that root is the built-in synthetic set described by :class:`SynthOptions` (the dataset's
``options.synth``), generated once and cached by config hash (:mod:`pyface.data.cache`). With
``data.path`` set to a folder that holds no dataset yet, the same set is generated there.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger("pyface.data")


@dataclass
class SynthOptions:
    """The built-in synthetic set (``data.options.synth.*``). The default is what every model
    needs: 8 identities x 2 videos x 48 frames (27-frame motion windows, 8-frame clips with
    gaps), with the cross-identity ground truth and the second camera of every video.

    ``resolution``: None renders at ``data.resolution``. ``zoom``, ``exp_leak``: see
    :class:`pyface.data.synthetic.SynthConfig`. ``workers``: generation processes (0: all cores;
    not part of the cache key). ``cross``, ``multiview``: also write the cross-identity ground
    truth and the second camera of every video (default on; a set used only for clips, e.g.
    Export3D's CLeBS pre-training on many identities, can leave them out)."""

    identities: int = 8
    videos_per_identity: int = 2
    frames: int = 48
    resolution: int | None = None
    seed: int = 0
    fps: float = 25.0
    zoom: float = 0.0
    exp_leak: float = 0.0
    workers: int = 0
    cross: bool = True
    multiview: bool = True

    def synth_config(self, resolution: int):
        """The :class:`~pyface.data.synthetic.SynthConfig` (with the cross-identity set and
        multi-view unless ``cross`` / ``multiview`` are off) at ``self.resolution or
        resolution``."""
        from pyface.data.synthetic import SynthConfig

        return SynthConfig(identities=self.identities, videos_per_identity=self.videos_per_identity,
                           frames=self.frames, resolution=int(self.resolution or resolution),
                           seed=self.seed, fps=self.fps,
                           cross=bool(self.cross) and self.identities >= 2,
                           workers=self.workers, zoom=self.zoom, exp_leak=self.exp_leak,
                           multiview=bool(self.multiview))


def resolve_root(cfg, synth: SynthOptions | None) -> str:
    """The dataset root of a data config (``cfg.path``, ``cfg.resolution``): ``cfg.path`` when it
    holds a dataset (``index.json`` or video folders); the built-in set generated into
    ``cfg.path`` when that folder is empty or absent (absent: its parent folder must exist, so
    that a typo in a parent is an error; a log line names the folder either way); the cached
    built-in set when ``cfg.path`` is unset."""
    from pyface.data import format as fmt

    synth = synth or SynthOptions()
    if not cfg.path:
        from pyface.data.cache import cached

        return cached(_synth_config(cfg, synth))
    path = os.fspath(cfg.path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise fmt.DataError(f"data.path: {fmt._not_a_root(path)}")
    if os.path.isfile(os.path.join(path, fmt.SYNTH_PARTIAL)):
        from pyface.data.synthetic import generate

        generate(path, _synth_config(cfg, synth), progress=False)   # finish it, or refuse
        return path
    if os.path.isfile(os.path.join(path, fmt.INDEX)) or \
            (os.path.isdir(path) and fmt.video_names(path)):
        return path
    if os.path.isdir(path) and os.listdir(path):
        raise fmt.DataError(f"{path}: neither a pyface dataset (index.json or video folders) nor "
                            "empty; refusing to generate the synthetic set into it")
    from pyface.data.synthetic import generate

    config = _synth_config(cfg, synth)
    what = (f"data.options.synth: identities={config.identities}, videos_per_identity="
            f"{config.videos_per_identity}, frames={config.frames}; {config.resolution} px")
    if os.path.isdir(path):
        log.info("data.path %s is empty: generating the synthetic set there (%s)", path, what)
    else:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise fmt.DataError(
                f"data.path {path}: neither it nor its parent folder {parent} exists (a typo?); "
                "the synthetic set is generated into an empty or absent data.path whose parent "
                "folder exists: give the path of a dataset, or create the parent folder")
        log.warning("data.path %s does not exist: generating the synthetic set there (%s; a "
                    "dataset meant to be read from elsewhere: check the path)", path, what)
    generate(path, config, progress=False)
    return path


def _synth_config(cfg, synth: SynthOptions):
    """``synth.synth_config(cfg.resolution)``; a bad value is a DataError naming its key."""
    from pyface.data import format as fmt

    try:
        return synth.synth_config(cfg.resolution)
    except ValueError as exc:       # "field: message" from SynthConfig
        field, _, msg = str(exc).partition(": ")
        key = ("data.resolution" if field == "resolution" and not synth.resolution
               else f"data.options.synth.{field}")
        raise fmt.DataError(f"{key}: {msg}") from None
