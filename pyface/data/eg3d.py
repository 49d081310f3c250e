"""EG3D-format image datasets: a folder or an uncompressed zip of images plus ``dataset.json``
(``{"labels": [["img00000000.png", [25 floats]], ...]}``: file name and EG3D camera label, the
layout of NVlabs/eg3d's dataset tool; FFHQ-style data is user-provided).

Items: ``image`` (3, R, R) float in [-1, 1] (antialiased resize to ``data.resolution`` when the
files differ), ``camera`` (25,) float32, ``index``. Registered as dataset ``eg3d``.
"""
from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np
import torch
import torch.nn.functional as F

LABELS_FILE = "dataset.json"


class EG3DImageDataset(torch.utils.data.Dataset):
    """Args: path (folder or .zip), resolution (R)."""

    def __init__(self, path: str, resolution: int):
        if not os.path.exists(path):
            raise FileNotFoundError(f"data.path: {path!r} does not exist (expected an EG3D "
                                    f"dataset folder or zip with {LABELS_FILE})")
        self.path, self.resolution = path, int(resolution)
        self._zip = None
        raw = self._read(LABELS_FILE)
        try:
            labels = json.loads(raw)["labels"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}/{LABELS_FILE}: expected {{\"labels\": [[name, [25 "
                             "floats]], ...]}}") from None
        if not labels:
            raise ValueError(f"{path}/{LABELS_FILE}: no labels")
        self.files = [str(n) for n, _ in labels]
        lab = np.asarray([c for _, c in labels], dtype=np.float32)
        if lab.ndim != 2 or lab.shape[1] != 25:
            raise ValueError(f"{path}/{LABELS_FILE}: labels must be 25 floats (cam2world 16 + "
                             f"intrinsics 9), got shape {lab.shape}")
        self.labels = torch.from_numpy(lab)

    @classmethod
    def from_config(cls, cfg) -> "EG3DImageDataset":
        if not cfg.path:
            raise ValueError("data.path: the eg3d dataset needs a folder or zip with "
                             f"{LABELS_FILE}")
        return cls(cfg.path, cfg.resolution)

    def _read(self, name: str) -> bytes:
        if os.path.isdir(self.path):
            with open(os.path.join(self.path, name), "rb") as f:
                return f.read()
        if self._zip is None:                     # opened lazily per worker process
            self._zip = zipfile.ZipFile(self.path)
        try:
            return self._zip.read(name)
        except KeyError:
            raise FileNotFoundError(f"{self.path}: no {name!r} in the zip") from None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        from PIL import Image

        with Image.open(io.BytesIO(self._read(self.files[index]))) as im:
            arr = np.asarray(im.convert("RGB"))
        img = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1
        R = self.resolution
        if img.shape[-2:] != (R, R):
            img = F.interpolate(img[None], size=(R, R), mode="bilinear", align_corners=False,
                                antialias=True)[0]
        return {"image": img, "camera": self.labels[index].clone(),
                "index": torch.tensor(index)}

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_zip"] = None
        return d
