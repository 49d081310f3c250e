"""Export3D inference: the source is encoded once (the expression-free part of the generator),
every driving frame gives an expression (from its 3DMM coefficients) and a camera.

* ``encode_source(source)``: ``{"features": generator.encode(image (1, 3, R, R)), "camera":
  (1, 25) or None, "beta": (1, 64) or None}``.
* ``encode_driving(driving)``: ``{"beta": (T, 64), "lambda": (T, n) or None, "camera": (T, 25)
  or None}``; ``driving["coeffs"] (T, 257)`` is required (Export3D is driven by 3DMM
  expressions, e.g. from Deep3DFaceRecon, prepared outside pyface), ``image`` is not read
  (optional).
* ``generate(state, motion, camera="driving"|"source"|"orbit", lam_scale=None, chunk=16)``:
  ``(T, 3, R, R)`` float in [-1, 1], ``chunk`` frames at a time. ``lam_scale`` ((n,), (T, n) or {index: factor})
  scales individual basis coefficients lambda_i (editing; e2e / clebs); ``camera="orbit"`` follows
  the free-view orbit of ``pyface animate --camera orbit``, a +-20 / 8 degree ellipse at EG3D's
  FFHQ radius and pivot (:func:`pyface.face.cameras.free_view_orbit`), one turn over a
  ``stream``'s frames (``locate``; over the ``T`` frames of a ``generate`` called on its own). With
  ``model.expr_relative`` the source's coefficients (``source['coeffs']``) are required: the
  expression planes move the source by the change from its expression to the driving one.
  With ``model.source_mouth_mask`` the source's landmarks (``source['landmarks'] (68, 2)``,
  pixels) are required: its mouth box is masked in the paths that copy the source. Both are
  checked by ``encode_source`` before it encodes.
"""
from __future__ import annotations

import math
import numbers
import operator

import torch

from pyface.face.cameras import default_label, free_view_orbit
from pyface.models.export3d.clebs import expression_of
from pyface.train.model import Pipeline, check_choice, frame_place, locate_frames

CAMERAS = ("driving", "source", "orbit")

_RELATIVE_NEEDS_COEFFS = ("source['coeffs']: required with model.expr_relative (the expression "
                          "planes move the source by its expression change)")


class Export3DPipeline(Pipeline):
    """See the module docstring. ``model``: an :class:`~pyface.models.export3d.Export3D`."""

    #: compiled by :meth:`compile`: the generator's conditioned transformer, the renderer and
    #: the super-resolution (the generator's convolutions are torch modules, which
    #: ``Module.compile`` does not trace)
    compile_modules = ("generator.vit", "renderer", "sr")

    @classmethod
    def check_labels(cls, source=None, driving=None) -> None:
        """Driving frames need ``coeffs``; what the source needs depends on the model's config
        (``expr_relative``: coeffs, ``source_mouth_mask``: landmarks), checked by the stages."""
        if driving is not None and "coeffs" not in driving:
            raise ValueError("driving['coeffs']: missing; Export3D is driven by 3DMM expression "
                             "coefficients (T, 257) (a pyface video folder's coeffs.npy)")

    @torch.no_grad()
    def encode_source(self, source: dict) -> dict:
        src = self.prepare(source, batched=False)
        cfg = self.model.cfg
        if cfg.expr_relative and cfg.expr_planes and "coeffs" not in src:
            raise ValueError(_RELATIVE_NEEDS_COEFFS)      # before any encoding
        lm = None
        if cfg.source_mouth_mask:
            got = tuple(src["landmarks"].shape) if "landmarks" in src else None
            if got != (68, 2):
                raise ValueError(f"source['landmarks']: expected shape (68, 2) (pixels) with "
                                 f"model.source_mouth_mask (the source's mouth box is masked), "
                                 f"got {got}")
            lm = src["landmarks"][None].float()
        feats = self.model.generator.encode(src["image"][None])
        cam = src["camera"][None] if "camera" in src else None
        beta = expression_of(src["coeffs"][None], "source['coeffs']") if "coeffs" in src else None
        return {"features": feats, "camera": cam, "beta": beta, "image": src["image"][None],
                "landmarks": lm}

    @torch.no_grad()
    def encode_driving(self, driving: dict) -> dict:
        # the driving coefficients (and cameras) alone drive Export3D: an image is optional
        drv = self.prepare(driving, batched=True, name="driving", image=False)
        self.check_labels(driving=drv)
        beta = expression_of(drv["coeffs"], "driving['coeffs']")
        lam = self.model.cond.coefficients(beta)
        return {"beta": beta, "lambda": lam, "camera": drv.get("camera")}

    def _camera(self, state, motion, T: int, which: str) -> torch.Tensor:
        check_choice("camera", which, CAMERAS)
        if which == "orbit":
            idx, n = frame_place(motion, T)
            labels = free_view_orbit(max(n, 1), generator=self.model.generator)
            return labels[idx % labels.shape[0]].to(self.device)
        cam = motion["camera"] if which == "driving" else state["camera"]
        if cam is None:
            if which == "source" or state["camera"] is None:
                return default_label().to(self.device).reshape(1, 25).expand(T, -1)
            cam = state["camera"]
        return cam.expand(T, -1) if cam.shape[0] == 1 else cam

    def locate(self, motion, start: int, total: int):
        """Frames ``start ..`` of a ``total``-frame stream: ``camera="orbit"`` renders them at
        their place on one orbit over the ``total`` frames (:func:`locate_frames`)."""
        return locate_frames(motion, start, total) if isinstance(motion, dict) else motion

    @torch.no_grad()
    def generate(self, state: dict, motion: dict, *, camera: str = "driving",
                 lam_scale=None, chunk: int = 16) -> torch.Tensor:
        model = self.model
        self.check_state(state, ("features", "camera", "beta", "image"), device=True)
        self.check_state(motion, ("beta", "camera"), what="motion", stage="encode_driving")
        beta = motion["beta"]
        T = beta.shape[0]
        n = model.cond.n
        if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1:
            raise ValueError(f"chunk: expected an int >= 1, got {chunk!r}")
        if isinstance(lam_scale, dict):
            if n is None:
                raise ValueError("lam_scale: model.cond='direct' has no basis coefficients")
            s = torch.ones(n, device=self.device)
            for i, v in lam_scale.items():
                try:
                    i = operator.index(i)
                except TypeError:
                    raise ValueError(f"lam_scale: index {i!r}: expected an int in [0, {n})") \
                        from None
                if not 0 <= i < n:
                    raise ValueError(f"lam_scale: index {i} out of range [0, {n})")
                try:
                    v = float(v)
                except (TypeError, ValueError):
                    raise ValueError(f"lam_scale: index {i}: expected a finite number (the "
                                     f"factor of lambda_{i}), got {v!r}") from None
                if not math.isfinite(v):
                    raise ValueError(f"lam_scale: index {i}: expected a finite number (the "
                                     f"factor of lambda_{i}), got {v!r}")
                s[i] = v
            lam_scale = s
        elif lam_scale is not None:
            if n is None:
                raise ValueError("lam_scale: model.cond='direct' has no basis coefficients")
            lam_scale = torch.as_tensor(lam_scale, dtype=torch.float32, device=self.device)
            if tuple(lam_scale.shape) not in ((n,), (T, n)):
                raise ValueError(f"lam_scale: expected a dict {{index: factor}} or shape ({n},) "
                                 f"or ({T}, {n}), got {tuple(lam_scale.shape)}")
        cams = self._camera(state, motion, T, camera)
        if model.cfg.expr_relative and model.cfg.expr_planes and state["beta"] is None:
            raise ValueError(_RELATIVE_NEEDS_COEFFS)
        frames = []
        for t0 in range(0, T, chunk):
            b = beta[t0:t0 + chunk]
            ls = lam_scale[t0:t0 + chunk] if lam_scale is not None and lam_scale.dim() == 2 \
                else lam_scale
            _, cond, code = model.condition(b, ls, with_code=True)
            planes = model.generator.decode(state["features"], cond,
                                            model.expression_input(code, state["beta"]))
            out = model.render(planes, cams[t0:t0 + chunk], state["image"], cond,
                               state.get("landmarks"))
            frames.append(out["image"].clamp(-1, 1))
        return torch.cat(frames)
