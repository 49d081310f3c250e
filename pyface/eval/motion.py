"""Motion metrics of ``pyface eval``: akd (landmarks), aed / apd (3DMM expression and pose) and
aed_id (identity-feature distance), each with its exact protocol (docs/eval.md).

* **akd**: :func:`akd`, the mean over the 68 points of the Euclidean distance between two
  landmark sets, in pixels at the evaluation resolution (FOMM's evaluation script averages the
  absolute x and y differences instead: about 2/pi of this for isotropic errors; docs/eval.md).
* **aed** / **apd**: :func:`aed`, :func:`apd`: L1 distances of 3DMM coefficients (Deep3DFaceRecon
  layout, :mod:`pyface.face.coeffs`): aed the mean over the 64 expression coefficients
  (``coeffs[80:144]``) of ``|a - b|``, apd the mean over the 3 Euler angles (``coeffs[224:227]``,
  radians) of ``|a - b|`` (translation is not part of it). This is the arithmetic of the
  metric as the avatar papers describe it (e.g. GAGAvatar issue 36: ``l1_loss`` of the
  expression and of the first three pose entries); the coefficients here come from pyface's
  landmark-based fit (:func:`fit_coefficients`: :func:`pyface.face.fit.fit_landmarks` on 68
  detected points, the built-in head), not from Deep3DFaceRecon's image-based regressor, so the
  values are close in meaning but not equal to the papers'.
* **aed_id**: :func:`identity_distance`, the Euclidean distance between the unit ArcFace
  embeddings of the output and the ground truth (FOMM's "AED", used by MMFA, with ArcFace in
  place of OpenFace): ``sqrt(2 - 2 cos)``. FOMM's evaluation script computes the mean absolute
  element difference of the OpenFace vectors instead, so the scales differ from the papers'.
  Not Export3D's expression AED (that is ``aed``).
"""
from __future__ import annotations

import math

import torch

EXP = slice(80, 144)
ANGLES = slice(224, 227)


def _check_pair(name_a, a, name_b, b, shape_tail):
    if a.dim() != 1 + len(shape_tail) or tuple(a.shape[1:]) != shape_tail:
        raise ValueError(f"{name_a}: expected shape (N, {', '.join(map(str, shape_tail))}), "
                         f"got {tuple(a.shape)}")
    if b.shape != a.shape:
        raise ValueError(f"{name_b}: expected shape {tuple(a.shape)} (as {name_a}), got "
                         f"{tuple(b.shape)}")


def akd(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Average keypoint distance per image.

    pred, ref: (N, 68, 2) pixels -> (N,) float64: the mean over points of ``|pred_k - ref_k|``;
    NaN where either set is missing (NaN points)."""
    _check_pair("pred", pred, "ref", ref, (68, 2))
    return (pred.double() - ref.double()).norm(dim=-1).mean(-1)


def aed(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Average expression distance per frame.

    pred, ref: (N, 257) coefficients -> (N,) float64: mean over ``coeffs[80:144]`` of
    ``|pred - ref|``."""
    _check_pair("pred", pred, "ref", ref, (257,))
    return (pred[:, EXP].double() - ref[:, EXP].double()).abs().mean(-1)


def apd(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Average pose distance per frame.

    pred, ref: (N, 257) coefficients -> (N,) float64: mean over the Euler angles
    ``coeffs[224:227]`` (radians) of ``|pred - ref|``."""
    _check_pair("pred", pred, "ref", ref, (257,))
    return (pred[:, ANGLES].double() - ref[:, ANGLES].double()).abs().mean(-1)


def identity_distance(pred_embedding: torch.Tensor, ref_embedding: torch.Tensor) -> torch.Tensor:
    """aed_id per pair: pred_embedding, ref_embedding: (N, D) -> (N,) float64 Euclidean distance
    of the unit-normalised embeddings (``sqrt(2 - 2 cos)``, in [0, 2])."""
    if pred_embedding.dim() != 2:
        raise ValueError(f"pred_embedding: expected shape (N, D), got "
                         f"{tuple(pred_embedding.shape)}")
    if ref_embedding.shape != pred_embedding.shape:
        raise ValueError(f"ref_embedding: expected shape {tuple(pred_embedding.shape)} (as "
                         f"pred_embedding), got {tuple(ref_embedding.shape)}")
    a = torch.nn.functional.normalize(pred_embedding.double(), dim=1)
    b = torch.nn.functional.normalize(ref_embedding.double(), dim=1)
    return (a - b).norm(dim=1)


_FIT_MODELS: dict = {}


def fit_model(convention: str):
    """The morphable model and the vertex index of the 68 points for ``convention``
    (``"mediapipe"``: :func:`pyface.data.prepare.fit_model`, the head vertices measured under
    MediaPipe's points; ``"model"``: the built-in head with its own 68 landmark vertices).
    Cached per process."""
    if convention not in _FIT_MODELS:
        if convention == "mediapipe":
            from pyface.data.prepare import fit_model as prepare_fit_model
            _FIT_MODELS[convention] = prepare_fit_model()
        elif convention == "model":
            from pyface.face import MorphableModel
            _FIT_MODELS[convention] = (MorphableModel.builtin(), None)
        else:
            raise ValueError(f"convention: expected 'mediapipe' or 'model', got {convention!r}")
    return _FIT_MODELS[convention]


#: L-BFGS iterations of the fit (those of `pyface data prepare`).
FIT_STEPS = 100


def fit_coefficients(landmarks: torch.Tensor, image_size: int, *, convention: str = "mediapipe",
                     steps: int | None = None) -> torch.Tensor:
    """pyface's 3DMM fit of a group of frames of one face (one source's outputs, or the frames
    they should reproduce): :func:`pyface.face.fit.fit_landmarks` with the identity shared by the
    frames, expression and pose per frame, no temporal prior (each frame's motion is its own).

    Args:
        landmarks: (T, 68, 2) pixels of ``image_size`` square images; frames with NaN points
            (no face) are left out of the fit.
        convention: what the points mean (see :mod:`pyface.eval.landmarks`).
        steps: L-BFGS iterations (default :data:`FIT_STEPS`).
    Returns: (T, 257) float64 coefficients, NaN rows for the left-out frames.
    """
    from pyface.face.fit import FitConfig, fit_landmarks

    if landmarks.dim() != 3 or tuple(landmarks.shape[1:]) != (68, 2):
        raise ValueError(f"landmarks: expected shape (T, 68, 2), got {tuple(landmarks.shape)}")
    t = landmarks.shape[0]
    out = torch.full((t, 257), math.nan, dtype=torch.float64)
    ok = torch.isfinite(landmarks).flatten(1).all(1)
    if not ok.any():
        return out
    model, index = fit_model(convention)
    lm = landmarks[ok].float()
    n = lm.shape[0]
    with torch.enable_grad():
        res = fit_landmarks(model, lm, int(image_size), segments=torch.arange(n),
                            config=FitConfig(steps=int(steps or FIT_STEPS)), landmark_index=index)
    out[ok] = res.coeffs.double()
    return out
