# Provenance: reproduces the data preparation of GOHA ("Generalizable One-shot 3D Neural Head
# Avatar", NVlabs/GOHA, NVIDIA Source Code License, non-commercial): the pseudo-render of the
# expression branch, the expression-region masks of the canonical branch and the neutral render
# of its loss, from the paper and pyface's design study (shared/reference/specs/otavatar-goha.md
# section 2). Our own implementation; no upstream code is copied. pyface's code is licensed under
# Apache-2.0 (LICENSE).
"""GOHA's morphable-model renders, and the per-sample transform that computes them in the
dataset workers.

:class:`GOHARenders` holds the morphable model (built-in, or BFM from ``model.bfm_path``; one
per device, built on first use and never pickled) and renders, for batches:

* :meth:`~GOHARenders.region_mask`: the union of ``model.mask_regions`` (eyes dilated) at a
  camera ``(B, 1, S, S)`` in {0, 1};
* :meth:`~GOHARenders.pseudo_render`: the expression branch's input ``(B, 3, R, R)``;
* :meth:`~GOHARenders.neutral_render`: the expression-free render at a camera.

Called on one dataset item (``{"source": frame, "driving": frame}`` of the ``pairs`` or
``multiview`` datasets, each frame with ``coeffs (257,)`` and ``camera (25,)``), it adds the
renders a training step needs (R = ``model.resolution``, r = ``model.render_resolution``):

* ``source["goha_region_mask"] (1, R, R)``: the source's masked regions (canonical branch);
* ``source["goha_regions_neutral"] (1, R, R)``: the same with expression 0 (appearance blend);
* ``source["goha_pseudo"] (3, R, R)``: pseudo-render, the source's own expression;
* ``driving["goha_pseudo"] (3, R, R)``: pseudo-render, the source's identity / texture /
  lighting with the driving expression;
* ``driving["goha_target_regions"] (1, r, r)``: the driving frame's masked regions at r;
* ``driving["goha_neutral"] (3, r, r)`` in [-1, 1] and ``driving["goha_neutral_mask"]
  (1, r, r)``: the neutral render at the driving camera;
* ``driving["goha_mouth"] (1, r, r)``: the driving frame's mouth + lips at r (the mouth term,
  ``model.mouth_weight``; from the same render as its masked regions).

Three morphable-model renders per item, each over a batch of two (source and neutral source at
R; the two pseudo-renders; the neutral driving frame and the driving frame at r). ``GOHA``
reads these keys when a batch has them and computes the same renders in its step otherwise.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from pyface.face import cameras as cam
from pyface.face.coeffs import merge_coeffs, split_coeffs
from pyface.face.morphable import MorphableModel

from pyface.models.goha.networks import dilate

#: frame keys the transform adds (source / driving) and their shapes, S = "R" or "r"
SOURCE_KEYS = {"goha_region_mask": (1, "R"), "goha_regions_neutral": (1, "R"),
               "goha_pseudo": (3, "R")}
DRIVING_KEYS = {"goha_pseudo": (3, "R"), "goha_target_regions": (1, "r"),
                "goha_neutral": (3, "r"), "goha_neutral_mask": (1, "r"),
                "goha_mouth": (1, "r")}
#: the morphable-model regions of the mouth term (``model.mouth_weight``)
MOUTH_REGIONS = ("mouth", "lips")


def bfm224_label(angles: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
    """EG3D label ``(B, 25)`` of Deep3DFaceRecon's 224 crop camera (focal 1015 px, centre
    112 px, camera 10 BFM units from the origin) for a pose ``angles (B, 3)``, ``trans (B, 3)``:
    a render with it at any size S is Deep3DFaceRecon's 224 framing scaled by S / 224."""
    c2w = cam.deep3d_to_cam2world(angles, trans)
    k = cam.intrinsics_from_focal(cam.BFM_FOCAL / cam.BFM_IMAGE_SIZE,
                                  cx=cam.BFM_CENTER / cam.BFM_IMAGE_SIZE,
                                  cy=cam.BFM_CENTER / cam.BFM_IMAGE_SIZE,
                                  dtype=c2w.dtype, device=c2w.device)
    return cam.make_label(c2w, k)


class GOHARenders:
    """GOHA's morphable-model renders for a :class:`~pyface.models.goha.config.GOHAConfig`
    (see the module docstring); calling it on a dataset item adds them to the item."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._faces: dict = {}      # device -> MorphableModel (rebuilt in each process)

    def __getstate__(self):
        return {"cfg": self.cfg, "_faces": {}}

    def _prep(self):
        """The ops' default backends even under ``train.backend=reference`` when
        ``model.prep_default_backend`` (data preparation, not the tri-plane path)."""
        from pyface.ops import use_backend

        return use_backend(None) if self.cfg.prep_default_backend else contextlib.nullcontext()

    def face(self, device) -> MorphableModel:
        """The morphable model (built-in, or BFM from ``model.bfm_path``) on ``device``."""
        key = str(device)
        if key not in self._faces:
            base = (MorphableModel.from_bfm(self.cfg.bfm_path) if self.cfg.bfm_path
                    else MorphableModel.builtin())
            self._faces[key] = base.to(device)
        return self._faces[key]

    def _names(self, face: MorphableModel) -> list[str]:
        names = [r for r in self.cfg.mask_regions if r in face.region_names]
        if not names:
            raise ValueError(f"model.mask_regions: none of {self.cfg.mask_regions} is a region "
                             f"of the morphable model ({face.region_names})")
        return names

    def _union(self, regions: dict, names: list[str], dilate_eyes: bool) -> torch.Tensor:
        out = None
        for n in names:
            m = regions[n]
            if n == "eyes" and dilate_eyes:
                m = dilate(m, self.cfg.eye_dilation, self.cfg.eye_dilation_iters)
            out = m if out is None else torch.maximum(out, m)
        return out

    @torch.no_grad()
    def region_mask(self, coeffs: torch.Tensor, camera: torch.Tensor, size: int, *,
                    neutral: bool | torch.Tensor = False,
                    dilate_eyes: bool = True) -> torch.Tensor:
        """Union of the ``mask_regions`` of ``coeffs (B, 257)`` seen by ``camera (B, 25)``:
        ``(B, 1, size, size)`` in {0, 1}; eyes dilated (``eye_dilation``, ``_iters``);
        ``neutral`` (a bool, or ``(B,)`` bool per item) zeroes the expression first."""
        face = self.face(coeffs.device)
        names = self._names(face)
        c = coeffs.float().clone()
        if torch.is_tensor(neutral):
            if neutral.shape != (c.shape[0],):
                raise ValueError(f"neutral: expected a bool or shape ({c.shape[0]},), got "
                                 f"{tuple(neutral.shape)}")
            c[neutral.to(c.device), 80:144] = 0
        elif neutral:
            c[:, 80:144] = 0
        with self._prep():
            r = face.render(c, size, label=camera.float(), regions=tuple(names))
        return self._union(r.regions, names, dilate_eyes)

    @torch.no_grad()
    def mouth_mask(self, coeffs: torch.Tensor, camera: torch.Tensor, size: int) -> torch.Tensor:
        """The mouth + lips (:data:`MOUTH_REGIONS`) of ``coeffs (B, 257)`` seen by ``camera
        (B, 25)``: ``(B, 1, size, size)`` in {0, 1}."""
        with self._prep():
            r = self.face(coeffs.device).render(coeffs.float(), size, label=camera.float(),
                                                regions=MOUTH_REGIONS)
        return self._union(r.regions, list(MOUTH_REGIONS), False)

    @torch.no_grad()
    def pseudo_render(self, source_coeffs: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
        """The expression branch's input: identity, texture and lighting of
        ``source_coeffs (B, 257)``, ``expression (B, 64)``, the exemplar pose, rendered with the
        BFM-224 camera at ``pseudo_render_size`` and resized to R: ``(B, 3, R, R)`` in [-1, 1]."""
        B, dev = source_coeffs.shape[0], source_coeffs.device
        s = split_coeffs(source_coeffs.float())
        angles = torch.tensor(self.cfg.exemplar_angles, device=dev).expand(B, 3)
        trans = torch.tensor(self.cfg.exemplar_trans, device=dev).expand(B, 3)
        coeffs = merge_coeffs(s["id"], expression.float(), s["tex"], angles, s["gamma"], trans)
        with self._prep():
            r = self.face(dev).render(coeffs, self.cfg.pseudo_render_size,
                                      label=bfm224_label(angles, trans))
        img = r.image * 2 - 1
        R = self.cfg.resolution
        if img.shape[-1] != R:
            img = F.interpolate(img, size=(R, R), mode="bilinear", antialias=True,
                                align_corners=False)
        return img

    @torch.no_grad()
    def neutral_render(self, coeffs: torch.Tensor, camera: torch.Tensor, size: int):
        """The 3DMM render of ``coeffs (B, 257)`` with expression 0 at ``camera (B, 25)``:
        ``(image (B, 3, size, size) in [-1, 1], mask (B, 1, size, size))``."""
        c = coeffs.float().clone()
        c[:, 80:144] = 0
        with self._prep():
            r = self.face(coeffs.device).render(c, size, label=camera.float())
        return r.image * 2 - 1, r.mask

    # ------------------------------------------------------------------ per-sample transform
    @torch.no_grad()
    def __call__(self, item: dict) -> dict:
        """Adds the renders of the module docstring to ``item`` (``source`` / ``driving`` frame
        dicts with ``coeffs (257,)`` and ``camera (25,)``); returns the item."""
        for k in ("source", "driving"):
            if not isinstance(item.get(k), dict):
                raise KeyError(f"item[{k!r}]: missing; GOHA's renders need source / driving "
                               "frame dicts (the 'pairs' or 'multiview' datasets)")
            for key, n in (("coeffs", 257), ("camera", 25)):
                v = item[k].get(key)
                if v is None or tuple(v.shape) != (n,):
                    raise ValueError(f"item[{k!r}][{key!r}]: expected shape ({n},), got "
                                     f"{None if v is None else tuple(v.shape)}")
        s, d = item["source"], item["driving"]
        cs, cd = s["coeffs"].float()[None], d["coeffs"].float()[None]
        ks, kd = s["camera"].float()[None], d["camera"].float()[None]
        cfg, face = self.cfg, self.face(cs.device)
        names = self._names(face)
        # the source at R: its expression regions, and the same with expression 0
        m = self.region_mask(torch.cat([cs, cs]), torch.cat([ks, ks]), cfg.resolution,
                             neutral=torch.tensor([False, True]))
        # the pseudo-renders: the source's identity with its own / the driving expression
        p = self.pseudo_render(torch.cat([cs, cs]), torch.cat([cs, cd])[:, 80:144])
        # the driving camera at r: the neutral render, and the driving frame's regions (its
        # mouth + lips too, for the mouth term)
        neutral = cd.clone()
        neutral[:, 80:144] = 0
        wanted = tuple(dict.fromkeys(names + list(MOUTH_REGIONS)))
        with self._prep():
            r = face.render(torch.cat([neutral, cd]), cfg.render_resolution,
                            label=torch.cat([kd, kd]), regions=wanted)
        driving_regions = {n: v[1:] for n, v in r.regions.items()}
        s = dict(s, goha_region_mask=m[0], goha_regions_neutral=m[1], goha_pseudo=p[0])
        d = dict(d, goha_pseudo=p[1],
                 goha_target_regions=self._union(driving_regions, names, True)[0],
                 goha_mouth=self._union(driving_regions, list(MOUTH_REGIONS), False)[0],
                 goha_neutral=r.image[0] * 2 - 1, goha_neutral_mask=r.mask[0])
        return dict(item, source=s, driving=d)
