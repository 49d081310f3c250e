"""EG3D training data: EG3D ``dataset.json`` folders / zips (``pyface.data.datasets.EG3DDataset``)
as float images in [-1, 1] with their cameras. Registered as dataset ``eg3d``."""
from __future__ import annotations

import torch


class EG3DImages(torch.utils.data.Dataset):
    """Items ``image`` (3, R, R) float in [-1, 1], ``camera`` (25,), ``index``. Mirroring is done
    by the model (``model.mirror``), so the files are listed once."""

    def __init__(self, path: str, resolution: int, skip_bad: bool = False):
        from pyface.data.datasets import EG3DDataset

        self.images = EG3DDataset(path, resolution, skip_bad=skip_bad)

    @classmethod
    def from_config(cls, cfg) -> "EG3DImages":
        if not cfg.path:
            raise ValueError("data.path: the eg3d dataset needs a folder or zip with an EG3D "
                             "dataset.json (e.g. FFHQ processed by EG3D's dataset tool)")
        return cls(cfg.path, cfg.resolution, skip_bad=cfg.skip_bad)

    def __len__(self) -> int:
        return len(self.images)

    def item_labels(self, key: str) -> torch.Tensor | None:
        """``key``'s value of every item, read from ``dataset.json`` without decoding an image
        (``"camera"``), or None."""
        return self.images.item_labels(key)

    def __getitem__(self, index: int) -> dict:
        item = self.images[index]
        return {"image": item["image"].float() / 127.5 - 1, "camera": item["camera"].float(),
                "index": torch.tensor(index)}
