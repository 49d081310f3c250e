"""MMFA's inference pipeline: encode the source once, then stream driving frames.

* ``encode_source(source)`` -> state: the source ``image (1, 3, R, R)``, appearance ``volume (1, C, D, h, w)``, canonical keypoints
  ``kp_canonical (1, K, 3)``, the source's ``scale (1,)``, ``translation (1, 2)``,
  ``rotation (1, 3, 3)`` (keypoint space; from ``coeffs`` with ``rotation="gt"``, from the
  frozen Hopenet with ``"hopenet"``, else the identity), ``f_exp (1, exp_dim)`` and posed ``kp_source (1, K, 3)``.
* ``encode_driving(driving)`` -> motion: ``rotation (T, 3, 3)`` or None (no ``coeffs``: the
  source's rotation is kept), ``scale (T,)``, ``translation (T, 2)``, ``f_exp (T, exp_dim)``.
* ``generate(state, motion, **controls)`` -> (T, 3, R, R) in [-1, 1].

Controls of :meth:`MMFAPipeline.generate` (each overrides one attribute; the rest come from the
driving motion):

* ``cross_identity=True``: keep the source's scale and translation (another person's face size
  and position would otherwise be copied);
* ``rotation``: (3, 3) or (T, 3, 3) keypoint-space rotation, or ``angles=(pitch, yaw, roll)``
  in degrees (numbers or (T,) tensors), or ``rotation="source"``;
* ``scale``: a number or (T,) tensor, or ``"source"``;
* ``translation``: (2,) or (T, 2) tensor, or ``"source"``;
* ``expression``: ``"driving"`` (default), ``"source"``, or an f_exp tensor (exp_dim,) or
  (T, exp_dim).
"""
from __future__ import annotations

import torch

from pyface.train.model import Pipeline

from .motion import deep3d_to_keypoint_rotation, keypoint_rotation_from_degrees, pose_keypoints


class MMFAPipeline(Pipeline):
    """Inference with :class:`pyface.models.mmfa.MMFA` (see the module docstring)."""

    #: compiled by :meth:`compile`: the driving frames' encoders, the expression decoder, the
    #: dense motion and the generator's decoder
    compile_modules = ("pose_encoder", "exp_encoder", "exp_decoder", "dense_motion", "decoder")

    @property
    def net(self):
        """The MMFA networks (``model`` itself; the VAE pipeline's frozen stage-1 model)."""
        return self.model

    def _rotation(self, frames: dict, n: int):
        if self.net.cfg.rotation == "none":
            return torch.eye(3, device=self.device).expand(n, 3, 3)
        if self.net.cfg.rotation == "hopenet":
            return self.net.hopenet_rotation(frames["image"].reshape(n, *frames["image"].shape[-3:]))
        if "coeffs" not in frames:
            return None
        return deep3d_to_keypoint_rotation(frames["coeffs"].reshape(n, 257)[:, 224:227])

    def protocol_controls(self, protocol: str) -> dict:
        """``pyface eval``'s cross-identity protocol runs MMFA's cross-identity mode
        (``cross_identity=True``: the source's scale and translation, the issue's definition);
        the same-identity protocol takes every attribute from the driving frame."""
        return {"cross_identity": True} if protocol == "cross" else {}

    @torch.no_grad()
    def encode_source(self, source: dict) -> dict:
        src = self.prepare(source, batched=False)
        m = self.net
        img = src["image"][None]
        rot = self._rotation({k: v[None] for k, v in src.items()
                              if isinstance(v, torch.Tensor)}, 1)
        if rot is None:
            rot = torch.eye(3, device=self.device)[None]
        kc = m.kp_detector(img)["value"]
        mo = m.motion_of(img)
        delta = m.exp_decoder(mo["f_exp"], kc)
        kp = pose_keypoints(kc, rot, mo["scale"], mo["translation"], delta)
        return {"image": img, "volume": m.appearance(img), "kp_canonical": kc, "rotation": rot,
                "scale": mo["scale"], "translation": mo["translation"], "f_exp": mo["f_exp"],
                "kp_source": kp}

    @torch.no_grad()
    def encode_driving(self, driving: dict) -> dict:
        drv = self.prepare(driving, batched=True, name="driving")
        T = drv["image"].shape[0]
        mo = self.net.motion_of(drv["image"])
        mo["rotation"] = self._rotation(drv, T)
        return mo

    @staticmethod
    def _per_frame(value, T: int, shape: tuple, name: str, device) -> torch.Tensor:
        v = torch.as_tensor(value, dtype=torch.float32, device=device)
        if tuple(v.shape) == shape:
            v = v.expand(T, *shape)
        elif v.dim() == 0 and shape == ():
            v = v.expand(T)
        if tuple(v.shape) != (T, *shape):
            raise ValueError(f"{name}: expected shape {shape} or {(T, *shape)}, got "
                             f"{tuple(v.shape)}")
        Pipeline.check_finite(v, name)      # NaN / inf would render frames of NaN
        return v

    @torch.no_grad()
    def generate(self, state: dict, motion: dict, *, cross_identity: bool = False,
                 rotation=None, angles=None, scale=None, translation=None,
                 expression="driving") -> torch.Tensor:
        m, dev = self.net, self.device
        self.check_state(state, ("image", "volume", "kp_canonical", "rotation", "scale",
                                 "translation", "f_exp", "kp_source"), device=True)
        self.check_state(motion, ("f_exp", "scale", "translation"), what="motion",
                         stage="encode_driving")
        T = int(motion["f_exp"].shape[0])
        if rotation is not None and angles is not None:
            raise ValueError("rotation, angles: give at most one")
        if not isinstance(cross_identity, bool):
            raise ValueError(f"cross_identity: expected True or False, got {cross_identity!r}")
        # rotation
        if angles is not None:
            sized = hasattr(angles, "__len__") and not isinstance(angles, str) and not (
                isinstance(angles, torch.Tensor) and angles.dim() == 0)
            if not sized or len(angles) != 3:
                raise ValueError(f"angles: expected (pitch, yaw, roll) in degrees, got {angles}")
            rot = keypoint_rotation_from_degrees(*angles, batch=T, device=dev)
            rot = self._per_frame(rot[0], T, (3, 3), "angles", dev) if rot.shape[0] == 1 \
                else self._per_frame(rot, T, (3, 3), "angles", dev)
        elif isinstance(rotation, str):
            if rotation != "source":
                raise ValueError(f"rotation: expected a tensor or 'source', got {rotation!r}")
            rot = state["rotation"].expand(T, 3, 3)
        elif rotation is not None:
            rot = self._per_frame(rotation, T, (3, 3), "rotation", dev)
        else:
            rot = motion.get("rotation")
            rot = state["rotation"].expand(T, 3, 3) if rot is None else rot
        # scale and translation
        s, t = motion["scale"], motion["translation"]
        if cross_identity:
            s, t = state["scale"].expand(T), state["translation"].expand(T, 2)
        if isinstance(scale, str):
            if scale != "source":
                raise ValueError(f"scale: expected a number, a (T,) tensor or 'source', got "
                                 f"{scale!r}")
            s = state["scale"].expand(T)
        elif scale is not None:
            s = self._per_frame(scale, T, (), "scale", dev)
        if isinstance(translation, str):
            if translation != "source":
                raise ValueError(f"translation: expected a tensor or 'source', got "
                                 f"{translation!r}")
            t = state["translation"].expand(T, 2)
        elif translation is not None:
            t = self._per_frame(translation, T, (2,), "translation", dev)
        # expression
        if isinstance(expression, str):
            if expression not in ("driving", "source"):
                raise ValueError(f"expression: expected 'driving', 'source' or an f_exp tensor, "
                                 f"got {expression!r}")
            f = motion["f_exp"] if expression == "driving" else state["f_exp"].expand(T, -1)
        else:
            f = self._per_frame(expression, T, (m.cfg.exp_dim,), "expression", dev)
        kc = state["kp_canonical"].expand(T, -1, -1)
        delta = m.exp_decoder(f, kc)
        kp_d = pose_keypoints(kc, rot.contiguous(), s.contiguous(), t.contiguous(), delta)
        kp_s = state["kp_source"].expand(T, -1, -1)
        vol = state["volume"].expand(T, -1, -1, -1, -1)
        out = m.render(vol.contiguous(), kp_s.contiguous(), kp_d,
                       state["image"].expand(T, -1, -1, -1).contiguous())
        return out["images"][-1].clamp(-1, 1)
