"""Landmark detectors of ``pyface eval`` (akd, aed, apd and the output's jitter).

A *detector* is any object with

* ``name`` (str): recorded in the report;
* ``convention`` (str): what its 68 points mean on pyface's head model, for the 3DMM fit of aed /
  apd: ``"mediapipe"`` (pyface's MediaPipe layout, :func:`pyface.data.landmarks.mesh_to_68`; the
  fit uses the head vertices measured under it, :func:`pyface.data.prepare.fit_model`) or
  ``"model"`` (the head model's own 68 landmark vertices: the synthetic data's ground truth);
* ``detect(images) -> (landmarks, found)``: ``images (N, 3, H, W)`` float in [-1, 1] ->
  ``landmarks (N, 68, 2)`` float64 pixels of ``images`` (x right, y down, corner at 0, the
  convention of pyface's data) with NaN rows where no face was found, and ``found (N,)`` bool.

:class:`MediaPipeDetector` is pyface's detector (the one ``pyface data prepare`` runs, so real
clips are measured with the detector their landmarks come from). MediaPipe 0.10.21 pins
``numpy<2``: it is the ``prepare`` extra, usually in a virtualenv of its own
(:data:`EXTRA_HINT`); without it :func:`get_detector` raises :class:`MissingDetectorError` naming
the extra. Tests and users inject any other detector object through
``pyface.eval.evaluate.evaluate(..., detector=...)``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

EXTRA_HINT = ('pip install -e ".[prepare]" (mediapipe==0.10.21 and PyAV; MediaPipe pins numpy<2, '
              'so install the extra in a virtualenv of its own, as .ci/run does in .venv-prepare)')
#: Frames smaller than this are upsampled (bilinear) before MediaPipe sees them: its face
#: detector misses faces in very small images (checked on the 64 px synthetic frames).
MEDIAPIPE_MIN_SIZE = 192
CONVENTIONS = ("mediapipe", "model")


class MissingDetectorError(ImportError):
    """A metric that needs the landmark detector was asked for where it is not installed."""


def missing_detector_message(metrics) -> str:
    names = ", ".join(repr(m) for m in metrics)
    return (f"metric {names} needs a 68-point landmark detector run on the predictions: pyface's "
            f"MediaPipe detector, from the `prepare` extra, which is not installed here. Install "
            f"it with: {EXTRA_HINT}; or pass a detector object to "
            f"pyface.eval.evaluate.evaluate(detector=...)")


def have_mediapipe() -> bool:
    """Whether MediaPipe's legacy face-mesh solution can be imported."""
    import importlib.util
    if importlib.util.find_spec("mediapipe") is None:
        return False
    try:
        from mediapipe.python.solutions import face_mesh  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install counts as missing
        return False
    return True


class MediaPipeDetector:
    """pyface's 68-point detector: MediaPipe's face mesh (478 points; static-image mode, one
    face) mapped to the iBUG-68 layout by :func:`pyface.data.landmarks.mesh_to_68`, as
    ``pyface data prepare`` does (without its temporal smoothing: every image is detected on its
    own). Images smaller than :data:`MEDIAPIPE_MIN_SIZE` are upsampled (bilinear, then rounded to
    8 bits) and the points scaled back."""

    name = "mediapipe"
    convention = "mediapipe"

    def __init__(self, min_size: int = MEDIAPIPE_MIN_SIZE):
        if not have_mediapipe():
            raise MissingDetectorError(missing_detector_message(["akd"]))
        from pyface.data.prepare import MediaPipeFaces
        self.min_size = int(min_size)
        self._faces = MediaPipeFaces(max_faces=1, static=True)

    def detect(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images: (N, 3, H, W) float in [-1, 1] -> landmarks (N, 68, 2) float64 pixels (NaN
        where no face), found (N,) bool."""
        from pyface.data.landmarks import mesh_to_68

        _check_images(images)
        n, _, h, w = images.shape
        scale = max(1.0, self.min_size / min(h, w))
        x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5)
        if scale > 1:
            x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear",
                              align_corners=False)
        x = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        out = torch.full((n, 68, 2), float("nan"), dtype=torch.float64)
        found = torch.zeros(n, dtype=torch.bool)
        sx, sy = w / x.shape[2], h / x.shape[1]
        for i in range(n):
            faces = self._faces.faces(x[i])
            if not faces:
                continue
            lm = mesh_to_68(faces[0][0]).astype(np.float64)
            out[i] = torch.from_numpy(lm) * torch.tensor([sx, sy], dtype=torch.float64)
            found[i] = True
        return out, found

    def close(self):
        self._faces.close()


def _check_images(images: torch.Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected shape (N, 3, H, W), got {tuple(images.shape)}")


def check_detector(detector) -> None:
    """Raises TypeError / ValueError when ``detector`` lacks the interface above."""
    if not callable(getattr(detector, "detect", None)):
        raise TypeError(f"detector: expected an object with detect(images) -> (landmarks, "
                        f"found), got {type(detector).__name__}")
    conv = getattr(detector, "convention", None)
    if conv not in CONVENTIONS:
        raise ValueError(f"detector.convention: expected one of {CONVENTIONS}, got {conv!r}")


def detect(detector, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs ``detector`` on ``images (N, 3, H, W)`` in [-1, 1] and checks its answer ->
    ``landmarks (N, 68, 2)`` float64 on the CPU (NaN rows where not found), ``found (N,)``."""
    _check_images(images)
    lm, found = detector.detect(images)
    lm = torch.as_tensor(lm).detach().double().cpu()
    found = torch.as_tensor(found).detach().bool().cpu()
    n = images.shape[0]
    if tuple(lm.shape) != (n, 68, 2):
        raise ValueError(f"detector.detect: expected landmarks of shape ({n}, 68, 2), got "
                         f"{tuple(lm.shape)}")
    if tuple(found.shape) != (n,):
        raise ValueError(f"detector.detect: expected found of shape ({n},), got "
                         f"{tuple(found.shape)}")
    found = found & torch.isfinite(lm).flatten(1).all(1)
    lm[~found] = float("nan")
    return lm, found


def get_detector(spec="auto", *, required_by=()):
    """The detector of an evaluation.

    Args:
        spec: a detector object (returned as is, after :func:`check_detector`); ``"mediapipe"``:
            :class:`MediaPipeDetector` (raises :class:`MissingDetectorError` when MediaPipe is
            not installed); ``"auto"``: MediaPipe when installed, else None when no metric in
            ``required_by`` needs one (else the error); ``"none"`` / None: no detector (an error
            when ``required_by`` is not empty).
        required_by: the requested metrics that cannot run without a detector.
    """
    required_by = list(required_by)
    if spec is None or spec == "none":
        if required_by:
            raise MissingDetectorError(missing_detector_message(required_by).replace(
                "which is not installed here", "and detection was turned off (--detector none)"))
        return None
    if isinstance(spec, str):
        if spec not in ("auto", "mediapipe"):
            raise ValueError(f"detector: expected 'auto', 'mediapipe', 'none' or a detector "
                             f"object, got {spec!r}")
        if not have_mediapipe():
            if spec == "auto" and not required_by:
                return None
            raise MissingDetectorError(missing_detector_message(required_by or ["akd"]))
        return MediaPipeDetector()
    check_detector(spec)
    return spec
