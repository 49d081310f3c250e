"""A tiny built-in procedural dataset: deterministic cartoon "faces" (shapes and colours).

Item ``i`` depends on ``(seed, i)`` only (so batches are reproducible across workers, ranks and
resumes). It exists so that the engine can be exercised end to end with no download; the
synthetic talking-head data engine (``pyface.data``) replaces it for real models.
"""
from __future__ import annotations

import math

import torch

from pyface.data.datasets import FrameDataset


class ProceduralFaces(torch.utils.data.Dataset):
    """Items ``{"image": (3, R, R) in [-1, 1], "index": ()}``: a coloured background, a head
    ellipse, two eyes and a mouth whose sizes, colours, positions and openness vary per item.

    Args:
        size: number of items.
        resolution: R.
        seed: dataset seed.
    """

    def __init__(self, size: int = 2048, resolution: int = 64, seed: int = 0):
        if size <= 0 or resolution < 8:
            raise ValueError(f"ProceduralFaces: size must be > 0 and resolution >= 8, got "
                             f"size={size}, resolution={resolution}")
        self.size, self.resolution, self.seed = size, resolution, seed
        lin = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution * 2 - 1
        self._y, self._x = torch.meshgrid(lin, lin, indexing="ij")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} items")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index))
        r = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
        x, y = self._x, self._y
        bg = r(3) * 0.6
        img = bg.view(3, 1, 1).expand(3, *x.shape).clone()
        cx, cy = (r(2) - 0.5) * 0.3
        ax, ay = 0.45 + 0.2 * r(1).item(), 0.55 + 0.2 * r(1).item()
        ang = (r(1).item() - 0.5) * 0.6
        ca, sa = math.cos(ang), math.sin(ang)
        u = ((x - cx) * ca + (y - cy) * sa) / ax
        v = (-(x - cx) * sa + (y - cy) * ca) / ay
        head = (1 - (u * u + v * v)).mul(8).clamp(0, 1)
        skin = 0.4 + 0.6 * r(3)
        img = img * (1 - head) + skin.view(3, 1, 1) * head
        eye_r = 0.12 + 0.08 * r(1).item()
        eye_col = r(3) * 0.4
        for side in (-1, 1):
            d = ((u - side * 0.4) ** 2 + (v + 0.25) ** 2).sqrt()
            m = ((eye_r - d) * 40).clamp(0, 1) * head
            img = img * (1 - m) + eye_col.view(3, 1, 1) * m
        openness = 0.03 + 0.15 * r(1).item()
        width = 0.25 + 0.2 * r(1).item()
        mouth = ((1 - ((u / width) ** 2 + ((v - 0.45) / openness) ** 2)) * 6).clamp(0, 1) * head
        lip = torch.tensor([0.6, 0.1, 0.15]) + 0.3 * r(3)
        img = img * (1 - mouth) + lip.clamp(0, 1).view(3, 1, 1) * mouth
        return {"image": img * 2 - 1, "index": torch.tensor(index)}


class SyntheticFrames(torch.utils.data.Dataset):
    """Frames of the synthetic talking-head data (:mod:`pyface.data`) for the engine (registered
    as ``synthetic``): ``image`` (3, R, R) float in [-1, 1], ``mask`` (1, R, R) float in [0, 1],
    and the rest of :class:`pyface.data.datasets.FrameDataset`'s tensors (``camera`` (25,),
    ``coeffs`` (257,), ``landmarks`` (68, 2), ids).

    ``data.path`` names a dataset folder (generated there first when it is empty); unset, the
    built-in synthetic set (``data.options.synth``) is generated once and cached
    (:func:`pyface.data.builtin.resolve_root`). Options: :class:`Options`.
    """

    Options = FrameDataset.Options    # mirror, load_masks, synth

    def __init__(self, root: str, resolution: int, seed: int = 0, skip_bad: bool = False,
                 mirror: bool = False, load_masks: bool = True):
        self.frames = FrameDataset(root, resolution, seed=seed, skip_bad=skip_bad, mirror=mirror,
                                   load_masks=load_masks)

    @classmethod
    def from_config(cls, cfg) -> "SyntheticFrames":
        from pyface.data.builtin import resolve_root
        from pyface.data.datasets import options_of

        o = options_of(cls, getattr(cfg, "options", None))
        root = resolve_root(cfg, o.synth)
        return cls(root, cfg.resolution, cfg.seed, skip_bad=cfg.skip_bad, mirror=o.mirror,
                   load_masks=o.load_masks)

    def __len__(self) -> int:
        return len(self.frames)

    def item_labels(self, key: str) -> torch.Tensor | None:
        """``key``'s value of every item without decoding a frame
        (:meth:`FrameDataset.item_labels`: ``"camera"``), or None."""
        return self.frames.item_labels(key)

    def __getitem__(self, index: int) -> dict:
        item = self.frames[index]
        out = {k: v for k, v in item.items() if isinstance(v, torch.Tensor)}
        out["image"] = item["image"].float() / 127.5 - 1
        if "mask" in out:
            out["mask"] = out["mask"].float() / 255
        out["index"] = torch.tensor(index)
        return out
