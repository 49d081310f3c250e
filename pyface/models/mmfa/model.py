"""MMFA: unsupervised 3D keypoints with a scaled-orthographic transform, an expression codec and a
multi-scale warping generator on the fused 3D-flow ops.

MMFA (Li et al. 2026; no code released) is built from the paper's description, on the
structure of face-vid2vid (Wang et al. 2021); the code is our own. Architecture, losses and
presets: docs/models/mmfa.md.

Shapes (full size, 256^2, K = 15; ``tiny``: 64^2, K = 10, a 16 x 8 x 16^2 volume):

* appearance: image (B, 3, R, R) -> volume (B, 32, 16, R/4, R/4);
* canonical keypoints x_c: (B, K, 3) from the source (CanonicalKeypointDetector);
* scale / translation head: image -> (log s, t_x, t_y), s = exp(log s): (B,), (B, 2);
* expression encoder: image -> f_exp (B, exp_dim); decoder: (f_exp, x_c) -> delta (B, K, 3);
* rotation R (B, 3, 3): from the ground-truth Deep3D angles of the frame (``rotation="gt"``;
  synthetic data), a frozen pretrained Hopenet (``"hopenet"``) or the identity (``"none"``);
* posed keypoints x = s R (x_c + delta) + (t_x, t_y, 0) for source and driving;
* DenseMotion masks (B, K+1, D, R/4, R/4) + occlusion (B, 1, R/4, R/4); the volume is warped by
  the fused ``warp_by_keypoints``;
* MultiScaleDecoder: images at R/4, R/2 and R (B, 3, r, r) in [-1, 1].
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pyface.data.datasets import to_float
from pyface.nn.augment import (AffineTPS, RandomAffineTPS, equivariance_loss,
                               keypoint_prior_loss)
from pyface.nn.discriminators import MultiScalePatchDiscriminator, PatchDiscriminatorConfig
from pyface.nn.fv2v import (AppearanceFeatureExtractor, CanonicalKeypointDetector,
                            MultiScaleDecoder)
from pyface.nn.losses import feature_matching_loss, gan_d_loss, gan_g_loss
from pyface.nn.motion import DenseMotion, DenseMotionConfig
from pyface.train.model import Phase, StepContext, TrainableModel, check_choice

from .pipeline import MMFAPipeline
from .motion import (ExpressionDecoder, ImageEncoder, deep3d_to_keypoint_rotation,
                     placement_from_label, pose_keypoints)

ROTATION_SOURCES = ("gt", "none", "hopenet")


@dataclass
class MMFAConfig:
    """MMFA hyper-parameters (defaults: the full 256^2 model; see docs/models/mmfa.md).

    Networks: ``app_*`` the appearance extractor (volume ``app_channels x app_depth`` at
    R / 2^app_down); ``kp_*`` the canonical keypoint detector; ``dm_*`` the dense-motion
    hourglass; ``dec_channels`` the multi-scale decoder (one output per entry); ``enc_channels``
    the two image encoders (scale/translation, expression) and ``exp_dim`` / ``exp_hidden`` the
    expression codec. ``rotation``: ``"gt"`` (keypoint-space rotation from the frames' Deep3D
    angles, ``coeffs[224:227]``), ``"none"`` (identity) or ``"hopenet"`` (a frozen, pretrained
    :class:`pyface.nn.Hopenet` on the frame's image; ``hopenet_weights``: a ``pyface convert
    hopenet`` folder or upstream's ``.pkl`` / ``.pth``; never downloaded).

    Losses (weights; 0 turns a term off): ``w_rec`` L1 pyramid on every output scale (levels:
    ``pyramid_levels`` at the finest output, one fewer per coarser one); ``w_perceptual`` VGG19
    pyramid (needs ``vgg_weights``, else it warns once and is off); ``w_gan`` / ``w_fm`` LSGAN and
    feature matching of a multi-scale PatchGAN on the final output; ``w_equivariance`` (random
    affine + TPS); ``w_prior`` keypoint prior (mean depth ``kp_prior_depth``: -0.33, on the
    camera's side of the rotation centre, since the keypoint space's z points away from the
    camera; face-vid2vid's +0.33 would put the keypoints behind the head's centre, where the
    ground-truth yaw and pitch move them against the face surface); ``w_delta`` L1 of delta; ``w_exp_consistency``
    1 - cos of f_exp under the augmentation; ``w_canonical`` L1 between x_c(S) and x_c(D);
    ``w_landmark`` the landmark term (:func:`landmark_flow_loss`): the depth-averaged dense
    motion at the driving frame's 68 landmarks must land on the source's (the frames'
    ``landmarks``: synthetic ground truth, or a detector's from ``pyface data prepare``), part
    weights ``landmark_weights`` (rest, eyes, mouth); frames without landmarks warn once and the
    term is off. ``w_exp_landmark`` the expression-landmark term (:func:`mouth_shape`,
    :func:`expression_landmark_loss`): a linear head on f_exp must predict the change of the
    eye-aligned mouth and chin landmarks from the source to the driving frame (0: off, and no
    head is built); ``exp_landmark_loss`` its error, ``"l1"`` or ``"mse"``
    (:func:`expression_landmark_loss`). ``exp_detach`` (our deviation, on in ``tiny``): in
    training, f_exp enters the expression decoder detached, so the expression encoder learns only
    from the expression-landmark term and the expression consistency, while the decoder,
    keypoints and dense motion learn to use it (the motion losses' gradient through delta
    otherwise keeps f_exp from reading the mouth at ``tiny``;
    docs/models/mmfa-measured.md); it needs
    ``w_exp_landmark > 0``. ``w_placement`` the placement term (our deviation, on in ``tiny``;
    :func:`placement_loss`): the scale / translation head's log s and (t_x, t_y) of source and
    driving against the head's placement in the frame's camera (:func:`~pyface.models.mmfa.
    motion.placement_from_label`: the projection of the head's rotation centre and its
    perspective size), so that s and t carry where the head is and not the face's shape, which
    then stays in the source's canonical keypoints (another identity's s and t otherwise resize
    the source's face in cross-identity reenactment); frames without ``camera`` warn once and the
    term is off. ``w_mouth`` the mouth term (our deviation, off in every preset;
    :func:`mouth_box_mask`, :func:`masked_l1`): the final output's L1 error inside the box of the
    driving frame's mouth landmarks (48-67, widened by ``mouth_margin`` pixels at 64^2, scaled
    with the resolution), averaged over the box's pixels, plus (with ``source_blend``) the same
    error of the decoder's own colour, so that the decoder paints what no warp of the source
    contains (the inside of an opening mouth); frames without landmarks: the landmark terms'
    warning, and the term is off. ``blend_cap``, ``w_blend_bound`` / ``blend_bound``: the
    source blend's mask m = blend_cap (tanh x + 1) / 2, and a penalty on |x| beyond the bound
    that keeps the tanh from saturating (a saturated mask passes no gradient, and the decoder
    then never paints). ``w_mouth_motion`` the mouth-motion term (our deviation, off by
    default; :func:`mouth_motion_loss`): the keypoints' motion caused by the expression alone,
    the image (x, y) of s_D R_D (delta_D - delta_S) at the driving frame's pose, must follow the
    eye-aligned change of the mouth and chin landmarks near them (``mouth_motion_sigma``: the
    nearness weights' width in grid units), so that the expression decoder's delta moves the
    keypoints at the mouth with the jaw; its gradient reaches delta only (the scale,
    translation and keypoint positions in it are detached). ``mouth_motion_mode="flow"``
    instead compares the dense motion (:func:`mouth_flow_loss`): a second dense-motion pass
    with the source's delta at the driving pose, and the difference of the two backward flows
    at the driving frame's mouth and chin must be minus the landmarks' expression motion (its
    gradient reaches delta, the keypoints and the dense motion). ``mouth_motion_start``: the
    training step from which the term is on (0: from the start). Frames without landmarks: the
    landmark terms' warning, and the term is off.

    Training differences from the paper (docs/models/mmfa.md, "Training options"; each default
    is pyface's earlier training, which ``tiny`` keeps and a saved run without the key resolves
    to; ``full`` and ``gpu-short`` set the paper's, :data:`PAPER_TRAINING`):
    ``perceptual_outputs`` ``"final"`` the VGG19 pyramid (:data:`PERCEPTUAL_SCALES`) on the final
    output only; ``"all"`` (the paper) on every output, one scale fewer per coarser output
    (1, 1/2, 1/4, 1/8 at R; 1, 1/2, 1/4 at R/2; 1, 1/2 at R/4), each against the driving frame
    resized to it. ``exp_consistency_warp`` the warp of the expression consistency:
    ``"affine_tps"`` the equivariance term's affine + TPS warp; ``"affine"`` (the paper's affine
    augmentation) the same warp's affine part alone, on which the expression encoder runs once
    more. ``bn_batches`` how a training step batches the keypoint detector and the pose and
    expression encoders over the source, driving and warped driving frames, hence what their
    BatchNorm layers normalise by and add to their running statistics: ``"joint"`` one pass over
    the 3B images together; ``"separate"`` (face-vid2vid's code, one forward pass per image set)
    one pass per set of B. In eval mode the two are the same network.
    """

    resolution: int = 256
    num_kp: int = 15
    rotation: str = "gt"
    hopenet_weights: str | None = None
    # appearance extractor
    app_block_expansion: int = 64
    app_down: int = 2
    app_max_features: int = 512
    app_channels: int = 32
    app_depth: int = 16
    app_resblocks: int = 6
    # canonical keypoint detector
    kp_scale_factor: float = 0.25
    kp_block_expansion: int = 32
    kp_max_features: int = 1024
    kp_blocks: int = 5
    kp_depth: int = 16
    kp_temperature: float = 0.1
    # dense motion
    dm_block_expansion: int = 32
    dm_blocks: int = 5
    dm_max_features: int = 1024
    dm_compress: int = 4
    # decoder
    dec_channels: list[int] = field(default_factory=lambda: [256, 128, 64])
    dec_res_blocks: int = 1
    # deviation (off in "full"): blend each output with the source image warped by the
    # depth-averaged dense motion, mask from a 4th decoder channel (see docs/models/mmfa.md)
    source_blend: bool = False
    # the blend mask's largest value (1: uncapped, every preset); below 1 the decoder's own
    # colour always enters every pixel, so it keeps training where the warped source wins
    blend_cap: float = 1.0
    # the blend mask's pre-activation x (m = blend_cap (tanh x + 1) / 2) is kept within
    # +-blend_bound by the penalty w_blend_bound * mean(relu(|x| - blend_bound)) (0: off), so
    # that the tanh does not saturate and m keeps learning (docs/models/mmfa.md)
    w_blend_bound: float = 0.0
    blend_bound: float = 3.0
    # encoders and expression codec
    enc_channels: list[int] = field(default_factory=lambda: [64, 128, 256, 512, 512])
    exp_dim: int = 128
    exp_hidden: int = 256
    # discriminator
    d_block_expansion: int = 64
    d_blocks: int = 4
    d_scales: list[float] = field(default_factory=lambda: [1.0, 0.5])
    # losses
    w_rec: float = 10.0
    pyramid_levels: int = 4
    w_perceptual: float = 0.0
    vgg_weights: str | None = None
    w_gan: float = 1.0
    w_fm: float = 10.0
    w_equivariance: float = 10.0
    w_prior: float = 10.0
    kp_prior_depth: float = -0.33
    w_delta: float = 5.0
    w_exp_consistency: float = 1.0
    w_canonical: float = 10.0
    w_landmark: float = 10.0
    landmark_weights: list[float] = field(default_factory=lambda: [1.0, 2.0, 2.0])
    w_exp_landmark: float = 0.0
    exp_landmark_loss: str = "l1"
    exp_detach: bool = False
    w_placement: float = 0.0
    w_mouth: float = 0.0
    mouth_margin: float = 4.0
    w_mouth_motion: float = 0.0
    mouth_motion_mode: str = "keypoints"
    mouth_motion_sigma: float = 0.2
    mouth_motion_start: int = 0
    sigma_affine: float = 0.05
    sigma_tps: float = 0.005
    # training differences from the paper: pyface's earlier training by default (see the
    # docstring and TRAINING_CHOICES; full and gpu-short set PAPER_TRAINING)
    perceptual_outputs: str = "final"
    exp_consistency_warp: str = "affine_tps"
    bn_batches: str = "joint"
    # optimisation
    lr: float = 2e-4
    lr_d: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])


#: the values of the training-difference options (:class:`MMFAConfig`); the first is the default
TRAINING_CHOICES = {"perceptual_outputs": ("final", "all"),
                    "exp_consistency_warp": ("affine_tps", "affine"),
                    "bn_batches": ("joint", "separate")}
#: the paper's training (``bn_batches``: face-vid2vid's code, which the paper builds on), set by
#: the full and gpu-short presets (the defaults differ in each)
PAPER_TRAINING = {"perceptual_outputs": "all", "exp_consistency_warp": "affine",
                  "bn_batches": "separate"}
#: the VGG19 pyramid of the perceptual term at the finest output (one scale fewer per coarser
#: output with ``perceptual_outputs="all"``)
PERCEPTUAL_SCALES = (1.0, 0.5, 0.25, 0.125)


#: iBUG-68 parts of the landmark term: eyes 36-47, mouth 48-67, the rest (jaw, brows, nose)
LANDMARK_PARTS = {"eyes": range(36, 48), "mouth": range(48, 68)}


def landmark_point_weights(weights, device=None) -> torch.Tensor:
    """(rest, eyes, mouth) part weights -> (68,) per-landmark weights."""
    if len(weights) != 3:
        raise ValueError(f"model.landmark_weights: expected 3 weights (rest, eyes, mouth), got "
                         f"{list(weights)}")
    w = torch.full((68,), float(weights[0]), device=device)
    w[36:48] = float(weights[1])
    w[48:68] = float(weights[2])
    return w


#: landmarks of the expression-landmark term: the mouth (48-67) and the chin (6-10)
MOUTH_SHAPE_POINTS = tuple(range(48, 68)) + tuple(range(6, 11))


def eye_frame(landmarks: torch.Tensor):
    """The eye-aligned frame of (B, 68, 2) landmarks in pixels -> origin (B, 2) between the eye
    centres (36-41, 42-47), unit axes ex (B, 2) along the eye line (left to right) and ey (B, 2)
    (ex turned by +90 degrees: down in the image for level eyes), and the inter-ocular distance
    (B, 1) in pixels."""
    if landmarks.dim() != 3 or tuple(landmarks.shape[1:]) != (68, 2):
        raise ValueError(f"landmarks: expected shape (B, 68, 2), got {tuple(landmarks.shape)}")
    left, right = landmarks[:, 36:42].mean(1), landmarks[:, 42:48].mean(1)    # (B, 2)
    origin, axis = (left + right) / 2, right - left
    dist = axis.norm(dim=-1, keepdim=True).clamp_min(1e-6)                   # (B, 1)
    ex = axis / dist
    ey = torch.stack([-ex[:, 1], ex[:, 0]], -1)
    return origin, ex, ey, dist


def mouth_shape(landmarks: torch.Tensor) -> torch.Tensor:
    """The eye-aligned shape of the mouth and chin: (B, 68, 2) landmarks in pixels ->
    (B, 2 * len(MOUTH_SHAPE_POINTS)) coordinates of :data:`MOUTH_SHAPE_POINTS` in a frame with
    its origin between the eye centres, its x axis along the eye line and the inter-ocular
    distance as unit (in-plane rotation, scale and translation removed)."""
    origin, ex, ey, dist = eye_frame(landmarks)
    pts = landmarks[:, list(MOUTH_SHAPE_POINTS)] - origin[:, None]           # (B, P, 2)
    local = torch.stack([(pts * ex[:, None]).sum(-1), (pts * ey[:, None]).sum(-1)], -1)
    return (local / dist[:, None]).flatten(1)


#: unit of the squared expression-landmark error (``kind="mse"``), in inter-ocular distances
EXP_LANDMARK_UNIT = 0.05
EXP_LANDMARK_KINDS = ("l1", "mse")


def expression_landmark_loss(pred_source: torch.Tensor, pred_driving: torch.Tensor,
                             lm_source: torch.Tensor, lm_driving: torch.Tensor,
                             kind: str = "l1") -> torch.Tensor:
    """The expression-landmark term: the predicted change of the mouth shape from source to
    driving against the landmarks' change.

    Args:
        pred_source, pred_driving: (B, 2P) the linear head's output on each frame's f_exp.
        lm_source, lm_driving: (B, 68, 2) landmarks in pixels.
        kind: ``"l1"``: mean abs error in inter-ocular distances; ``"mse"``: mean squared error
            in units of :data:`EXP_LANDMARK_UNIT` inter-ocular distances.
    Returns:
        () the error of ``(pred_d - pred_s) - (mouth_shape(lm_d) - mouth_shape(lm_s))``.
    """
    check_choice("kind", kind, EXP_LANDMARK_KINDS)
    target = mouth_shape(lm_driving) - mouth_shape(lm_source)
    for name, p in (("pred_source", pred_source), ("pred_driving", pred_driving)):
        if p.shape != target.shape:
            raise ValueError(f"{name}: expected shape {tuple(target.shape)}, got "
                             f"{tuple(p.shape)}")
    err = (pred_driving - pred_source) - target
    if kind == "mse":
        return (err / EXP_LANDMARK_UNIT).square().mean()
    return err.abs().mean()


MOUTH_MOTION_MODES = ("keypoints", "flow")
#: unit of the mouth-motion error, in grid units (2 = image width): one pixel at 64^2
MOUTH_MOTION_UNIT = 1.0 / 32


def expression_motion(lm_source: torch.Tensor, lm_driving: torch.Tensor,
                      size: int) -> torch.Tensor:
    """The expression's image motion of the mouth and chin: the change of the eye-aligned
    positions (:func:`mouth_shape`, driving minus source) put back into the driving frame's image
    (its eye line and inter-ocular distance), so that the head's pose does not enter it.

    Args:
        lm_source, lm_driving: (B, 68, 2) landmarks in pixels of the ``size``-pixel frames.
    Returns:
        (B, P, 2) the motion (x, y) of :data:`MOUTH_SHAPE_POINTS` in grid units (2 = image
        width).
    """
    if lm_driving.shape != lm_source.shape:
        raise ValueError(f"lm_driving: expected shape {tuple(lm_source.shape)} (lm_source's), "
                         f"got {tuple(lm_driving.shape)}")
    lm_s, lm_d = lm_source.float(), lm_driving.float()
    B = lm_d.shape[0]
    change = (mouth_shape(lm_d) - mouth_shape(lm_s)).view(B, -1, 2)        # (B, P, 2) IOD
    _, ex, ey, dist = eye_frame(lm_d)
    motion = dist[:, None] * (change[..., :1] * ex[:, None] + change[..., 1:] * ey[:, None])
    return motion * (2.0 / (size - 1))                                     # pixels -> grid


def _check_keypoints(kp_driving: torch.Tensor) -> None:
    if kp_driving.dim() != 3 or kp_driving.shape[-1] != 3:
        raise ValueError(f"kp_driving: expected shape (B, K, 3), got {tuple(kp_driving.shape)}")


def mouth_motion_target(kp_driving: torch.Tensor, lm_source: torch.Tensor,
                        lm_driving: torch.Tensor, size: int, sigma: float):
    """What the mouth-motion term asks of each keypoint: the expression's motion of the mouth
    and chin near it, and how near it is.

    The expression's motion of each point of :data:`MOUTH_SHAPE_POINTS` is the change of its
    eye-aligned position (:func:`mouth_shape`, driving minus source) put back into the driving
    frame's image (the driving frame's eye line and inter-ocular distance), so that the head's
    pose does not enter it. Each keypoint's target is the Gaussian-weighted mean of those
    motions over the points, weights exp(-d^2 / (2 sigma^2)) of the distance d between the
    keypoint and the point in the driving frame.

    Args:
        kp_driving: (B, K, 3) the driving frame's posed keypoints ([-1, 1] grid; x, y used).
        lm_source, lm_driving: (B, 68, 2) landmarks in pixels of the ``size``-pixel frames.
        size: the frames' resolution. sigma: the weights' width in grid units.
    Returns:
        target (B, K, 2) in grid units, and nearness (B, K) in (0, 1]: the largest weight.
    """
    _check_keypoints(kp_driving)
    B, K = kp_driving.shape[:2]
    for name, lm in (("lm_source", lm_source), ("lm_driving", lm_driving)):
        if tuple(lm.shape) != (B, 68, 2):
            raise ValueError(f"{name}: expected shape ({B}, 68, 2), got {tuple(lm.shape)}")
    if sigma <= 0:
        raise ValueError(f"sigma: expected a width > 0 (grid units), got {sigma}")
    motion = expression_motion(lm_source, lm_driving, size)               # (B, P, 2)
    pts = pixels_to_grid(lm_driving.float()[:, list(MOUTH_SHAPE_POINTS)], size)   # (B, P, 2)
    d2 = (kp_driving[:, :, None, :2].float() - pts[:, None]).square().sum(-1)   # (B, K, P)
    logw = -d2 / (2 * sigma ** 2)
    target = (torch.softmax(logw, -1)[..., None] * motion[:, None]).sum(2)     # (B, K, 2)
    return target, logw.amax(-1).exp()


def mouth_motion_loss(motion: torch.Tensor, kp_driving: torch.Tensor, lm_source: torch.Tensor,
                      lm_driving: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """The mouth-motion term: the keypoints' motion caused by the expression alone must follow
    the mouth and chin landmarks near them (:func:`mouth_motion_target`).

    Args:
        motion: (B, K, 2) each keypoint's image motion (x, y; grid units) from the source's
            expression to the driving frame's, at the driving frame's pose: the (x, y) of
            ``s_D R_D (delta_D - delta_S)``, i.e. what the mouth check's expression swap takes
            away.
        kp_driving: (B, K, 3) the driving frame's posed keypoints (where they are; no gradient).
        lm_source, lm_driving: (B, 68, 2) landmarks in pixels; size: the frames' resolution.
        sigma: the width (grid units) of the nearness weights.
    Returns:
        () the nearness-weighted mean over keypoints of the squared error, in units of
        :data:`MOUTH_MOTION_UNIT` (keypoints far from the mouth count little).
    """
    _check_keypoints(kp_driving)
    B, K = kp_driving.shape[:2]
    if motion.shape != (B, K, 2):
        raise ValueError(f"motion: expected shape ({B}, {K}, 2), got {tuple(motion.shape)}")
    with torch.no_grad():
        target, near = mouth_motion_target(kp_driving.detach(), lm_source, lm_driving, size,
                                           sigma)
    err = ((motion.float() - target) / MOUTH_MOTION_UNIT).square().sum(-1)    # (B, K)
    return (near * err).sum() / near.sum().clamp_min(1e-6)


def mouth_flow_loss(flow_driving: torch.Tensor, flow_swap: torch.Tensor,
                    lm_source: torch.Tensor, lm_driving: torch.Tensor,
                    size: int) -> torch.Tensor:
    """The mouth-motion term on the dense motion (``mouth_motion_mode="flow"``): the share of the
    backward flow that the expression makes, at the driving frame's mouth and chin, must be the
    landmarks' expression motion.

    If the expression moves a point by m in the driving frame, the backward flow there (driving
    -> source) changes by -m, so ``flow_driving - flow_swap`` sampled at the driving frame's
    :data:`MOUTH_SHAPE_POINTS` is compared with -:func:`expression_motion`.

    Args:
        flow_driving: (B, h, w, 2) the depth-averaged backward flow with the driving frame's
            keypoints ([-1, 1] grid).
        flow_swap: (B, h, w, 2) the same with the source's delta at the driving frame's pose (the
            mouth check's expression swap).
        lm_source, lm_driving: (B, 68, 2) landmarks in pixels; size: the frames' resolution.
    Returns:
        () the mean squared error over the points, in units of :data:`MOUTH_MOTION_UNIT`.
    """
    B = flow_driving.shape[0]
    if flow_driving.dim() != 4 or flow_driving.shape[-1] != 2:
        raise ValueError(f"flow_driving: expected shape (B, h, w, 2), got "
                         f"{tuple(flow_driving.shape)}")
    if flow_swap.shape != flow_driving.shape:
        raise ValueError(f"flow_swap: expected shape {tuple(flow_driving.shape)} "
                         f"(flow_driving's), got {tuple(flow_swap.shape)}")
    for name, lm in (("lm_source", lm_source), ("lm_driving", lm_driving)):
        if tuple(lm.shape) != (B, 68, 2):
            raise ValueError(f"{name}: expected shape ({B}, 68, 2), got {tuple(lm.shape)}")
    with torch.no_grad():
        target = -expression_motion(lm_source, lm_driving, size)          # (B, P, 2)
        grid = pixels_to_grid(lm_driving.float()[:, list(MOUTH_SHAPE_POINTS)], size)[:, :, None]
    diff = (flow_driving - flow_swap).float().permute(0, 3, 1, 2)          # (B, 2, h, w)
    at = F.grid_sample(diff, grid, mode="bilinear", padding_mode="border",
                       align_corners=True)[..., 0].transpose(1, 2)        # (B, P, 2)
    return ((at - target) / MOUTH_MOTION_UNIT).square().sum(-1).mean()


def placement_loss(scale: torch.Tensor, translation: torch.Tensor,
                   label: torch.Tensor) -> torch.Tensor:
    """The placement term: the head's predicted scale and translation against its placement in
    the frame's camera (:func:`~pyface.models.mmfa.motion.placement_from_label`).

    Args:
        scale: (B,) s, > 0; translation: (B, 2) (t_x, t_y) on the [-1, 1] grid.
        label: (B, 25) the frames' EG3D camera labels.
    Returns:
        () mean |log s - log s*| + mean over x, y of |t - t*| (grid units).
    """
    B = scale.shape[0]
    if scale.shape != (B,) or translation.shape != (B, 2) or label.shape != (B, 25):
        raise ValueError(f"scale, translation, label: expected shapes ({B},), ({B}, 2), "
                         f"({B}, 25), got {tuple(scale.shape)}, {tuple(translation.shape)}, "
                         f"{tuple(label.shape)}")
    log_s, t = placement_from_label(label.float())
    return (scale.log() - log_s).abs().mean() + (translation - t).abs().mean()


def pixels_to_grid(points: torch.Tensor, size: int) -> torch.Tensor:
    """Pixel coordinates (..., 2) (x, y; 0 at the image's top-left edge, pixel centres at
    i + 0.5) -> the dense motion's [-1, 1] grid (inclusive linspace: -1 and 1 are the centres of
    the first and last pixels)."""
    return (points - 0.5) * (2.0 / (size - 1)) - 1.0


def landmark_flow_loss(flow: torch.Tensor, lm_source: torch.Tensor, lm_driving: torch.Tensor,
                       size: int, weights: torch.Tensor) -> torch.Tensor:
    """The landmark term: the backward motion at the driving frame's landmarks must point to the
    same landmarks in the source.

    Args:
        flow: (B, h, w, 2) for every driving position, the (x, y) position in the source, on the
            [-1, 1] grid (the depth-averaged dense motion, inclusive linspace).
        lm_source, lm_driving: (B, N, 2) landmarks in pixels of the ``size``-pixel frames.
        size: the frames' resolution.
        weights: (N,) per-landmark weights (:func:`landmark_point_weights`).
    Returns:
        () the weighted mean over landmarks of the L1 distance, in grid units (2 = image width).
    """
    B = flow.shape[0]
    if flow.dim() != 4 or flow.shape[-1] != 2:
        raise ValueError(f"flow: expected shape (B, h, w, 2), got {tuple(flow.shape)}")
    for name, lm in (("lm_source", lm_source), ("lm_driving", lm_driving)):
        if lm.dim() != 3 or lm.shape[0] != B or lm.shape[1:] != weights.shape + (2,):
            raise ValueError(f"{name}: expected shape ({B}, {weights.shape[0]}, 2), got "
                             f"{tuple(lm.shape)}")
    grid = pixels_to_grid(lm_driving.to(flow.dtype), size)[:, :, None]        # (B, N, 1, 2)
    at = F.grid_sample(flow.permute(0, 3, 1, 2), grid, mode="bilinear", padding_mode="border",
                       align_corners=True)[..., 0].transpose(1, 2)            # (B, N, 2)
    err = (at - pixels_to_grid(lm_source.to(flow.dtype), size)).abs().sum(-1)  # (B, N)
    w = weights.to(err)
    return (err * w).sum(-1).mean() / w.sum()


def mouth_box_mask(landmarks: torch.Tensor, size: int, margin: float) -> torch.Tensor:
    """The mouth term's region: landmarks (B, 68, 2) in pixels of ``size``-pixel frames ->
    (B, 1, size, size) float mask, 1 at the pixels whose centres lie in the box of the mouth
    landmarks 48-67 widened by ``margin`` pixels on every side."""
    if landmarks.dim() != 3 or tuple(landmarks.shape[1:]) != (68, 2):
        raise ValueError(f"landmarks: expected shape (B, 68, 2), got {tuple(landmarks.shape)}")
    pts = landmarks[:, 48:68].float()
    lo, hi = pts.amin(1) - margin, pts.amax(1) + margin                     # (B, 2)
    c = torch.arange(size, device=landmarks.device, dtype=torch.float32) + 0.5
    inx = (c >= lo[:, :1]) & (c <= hi[:, :1])                               # (B, size)
    iny = (c >= lo[:, 1:]) & (c <= hi[:, 1:])
    return (iny[:, :, None] & inx[:, None, :]).float()[:, None]


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """pred, target (B, C, H, W); mask (B, 1, H, W) in [0, 1] -> () the mean over the batch of
    each sample's mean abs error inside its mask (0 for an empty mask)."""
    if pred.shape != target.shape:
        raise ValueError(f"target: expected shape {tuple(pred.shape)} (pred's), got "
                         f"{tuple(target.shape)}")
    if mask.shape != (pred.shape[0], 1, *pred.shape[2:]):
        raise ValueError(f"mask: expected shape ({pred.shape[0]}, 1, {pred.shape[2]}, "
                         f"{pred.shape[3]}), got {tuple(mask.shape)}")
    err = ((pred - target).abs() * mask).sum((1, 2, 3))
    return (err / (mask.sum((1, 2, 3)) * pred.shape[1]).clamp_min(1.0)).mean()


def images_of(frame: dict, name: str, resolution: int) -> torch.Tensor:
    """``frame["image"]`` (B, 3, R, R), uint8 or float in [-1, 1] -> float in [-1, 1]."""
    if not isinstance(frame, dict) or "image" not in frame:
        raise ValueError(f"batch['{name}']: expected a frame dict with 'image' (B, 3, "
                         f"{resolution}, {resolution})")
    img = frame["image"]
    if img.dim() != 4 or tuple(img.shape[1:]) != (3, resolution, resolution):
        raise ValueError(f"batch['{name}']['image']: expected shape (B, 3, {resolution}, "
                         f"{resolution}) (model.resolution; set data.resolution to match), got "
                         f"{tuple(img.shape)}")
    if img.dtype == torch.uint8:
        return to_float(img) * 2 - 1
    return img.float()


def l1_pyramid(pred: torch.Tensor, target: torch.Tensor, levels: int) -> torch.Tensor:
    """Sum over scales 1, 1/2, ... (``levels`` of them) of the mean L1; pred, target (B, 3, h, w)."""
    total = pred.new_zeros(())
    for i in range(max(levels, 1)):
        if i:
            pred = F.avg_pool2d(pred, 2)
            target = F.avg_pool2d(target, 2)
        total = total + (pred - target).abs().mean()
    return total


class MMFA(TrainableModel):
    """MMFA (see the module docstring). ``forward(source, driving, ...)`` -> dict of outputs."""

    Config = MMFAConfig
    #: train.compile: the appearance extractor, keypoint detector, pose and expression
    #: encoders, expression decoder, dense motion and image decoder; not the patch
    #: discriminator (kept out like the other models' discriminators)
    compile_modules = ("appearance", "kp_detector", "pose_encoder", "exp_encoder",
                       "exp_decoder", "dense_motion", "decoder")
    Pipeline = MMFAPipeline
    recipe = {"data": {"name": "pairs", "resolution": 256,
                       "options": {"mode": "same_video", "synth": {"zoom": 0.2}}},
              "train": {"steps": 100000, "batch_size": 16, "ckpt_every": 5000,
                        "image_every": 1000,
                        "lr_schedule": {"kind": "step", "step_size": 60000, "gamma": 0.1}}}
    presets = {
        # spec (a): 64^2, K = 10, a 16 x 8 x 16^2 volume, R from the ground truth, L1 pyramid
        "tiny": {"model": {"resolution": 64, "num_kp": 10,
                           "app_block_expansion": 16, "app_max_features": 64,
                           "app_channels": 16, "app_depth": 8, "app_resblocks": 1,
                           "kp_scale_factor": 0.25, "kp_block_expansion": 16,
                           "kp_max_features": 128, "kp_blocks": 3, "kp_depth": 8,
                           "dm_block_expansion": 16, "dm_blocks": 3, "dm_max_features": 128,
                           "dec_channels": [64, 32, 16], "enc_channels": [16, 32, 64, 64],
                           "exp_dim": 32, "exp_hidden": 64, "w_gan": 0.0, "w_fm": 0.0,
                           "source_blend": True, "w_delta": 0.5, "w_exp_landmark": 10.0,
                           "exp_landmark_loss": "mse", "exp_detach": True,
                           "w_placement": 10.0, "w_equivariance": 20.0,
                           "lr": 1e-3, "betas": [0.5, 0.999]},
                 "data": {"resolution": 64},
                 "train": {"steps": 800, "batch_size": 4, "ckpt_every": 200,
                           "image_every": 200, "video_every": 0,
                           "lr_schedule": {"kind": "cosine", "warmup_steps": 20,
                                           "min_factor": 0.1}}},
        # spec (b): one H100/H200, about 8 minutes
        "gpu-short": {"model": {"resolution": 256, "num_kp": 15, "lr": 4e-4, "lr_d": 4e-4,
                                "source_blend": True, "w_exp_landmark": 10.0,
                                **PAPER_TRAINING},
                      "data": {"resolution": 256},
                      "train": {"steps": 2500, "batch_size": 16, "precision": "bf16",
                                "ckpt_every": 500, "image_every": 500,
                                "lr_schedule": {"kind": "cosine", "warmup_steps": 100,
                                                "min_factor": 0.1}}},
        # paper scale (face-vid2vid reimplementation's schedule)
        "full": {"model": {"resolution": 256, "num_kp": 15, "w_exp_landmark": 10.0,
                           **PAPER_TRAINING},
                 "data": {"resolution": 256},
                 "train": {"steps": 100000, "batch_size": 16}},
    }

    def __init__(self, cfg: MMFAConfig | None = None):
        super().__init__()
        cfg = cfg or MMFAConfig()
        check_choice("model.rotation", cfg.rotation, ROTATION_SOURCES)
        check_choice("model.exp_landmark_loss", cfg.exp_landmark_loss, EXP_LANDMARK_KINDS)
        if cfg.exp_detach and cfg.w_exp_landmark <= 0:
            raise ValueError(f"model.exp_detach: needs model.w_exp_landmark > 0 (the expression "
                             f"encoder's only training signal then), got w_exp_landmark = "
                             f"{cfg.w_exp_landmark}")
        check_choice("model.mouth_motion_mode", cfg.mouth_motion_mode, MOUTH_MOTION_MODES)
        if cfg.mouth_motion_sigma <= 0:
            raise ValueError(f"model.mouth_motion_sigma: expected a width > 0 (grid units), got "
                             f"{cfg.mouth_motion_sigma}")
        for k, allowed in TRAINING_CHOICES.items():
            check_choice(f"model.{k}", getattr(cfg, k), allowed)
        if not 0.0 < cfg.blend_cap <= 1.0:
            raise ValueError(f"model.blend_cap: expected a value in (0, 1], got "
                             f"{cfg.blend_cap}")
        m = 2 ** cfg.app_down
        if cfg.resolution % m:
            raise ValueError(f"model.resolution: expected a multiple of 2^app_down = {m}, got "
                             f"{cfg.resolution}")
        self.cfg = cfg
        self.hopenet = None
        if cfg.rotation == "hopenet":
            if not cfg.hopenet_weights:
                raise ValueError("model.hopenet_weights: expected a Hopenet weights path (`pyface "
                                 "convert hopenet` folder, .pkl or .pth) with "
                                 "model.rotation='hopenet', got None")
            from pyface.nn.hopenet import load_hopenet
            self.hopenet = load_hopenet(cfg.hopenet_weights)     # frozen, eval mode
        K = cfg.num_kp
        self.appearance = AppearanceFeatureExtractor(
            block_expansion=cfg.app_block_expansion, num_down_blocks=cfg.app_down,
            max_features=cfg.app_max_features, reshape_channel=cfg.app_channels,
            reshape_depth=cfg.app_depth, num_resblocks=cfg.app_resblocks)
        self.kp_detector = CanonicalKeypointDetector(
            num_kp=K, scale_factor=cfg.kp_scale_factor, block_expansion=cfg.kp_block_expansion,
            max_features=cfg.kp_max_features, num_blocks=cfg.kp_blocks,
            reshape_depth=cfg.kp_depth, temperature=cfg.kp_temperature)
        self.pose_encoder = ImageEncoder(list(cfg.enc_channels), 3)
        nn.init.zeros_(self.pose_encoder.fc.weight)
        nn.init.zeros_(self.pose_encoder.fc.bias)
        self.exp_encoder = ImageEncoder(list(cfg.enc_channels), cfg.exp_dim)
        self.exp_decoder = ExpressionDecoder(cfg.exp_dim, K, cfg.exp_hidden)
        # training-only head of the expression-landmark term (f_exp -> mouth-shape coordinates)
        self.exp_landmark_head = (nn.Linear(cfg.exp_dim, 2 * len(MOUTH_SHAPE_POINTS))
                                  if cfg.w_exp_landmark > 0 else None)
        self.dense_motion = DenseMotion(DenseMotionConfig(
            num_kp=K, feature_channel=cfg.app_channels, block_expansion=cfg.dm_block_expansion,
            num_blocks=cfg.dm_blocks, max_features=cfg.dm_max_features,
            reshape_depth=cfg.app_depth, compress=cfg.dm_compress))
        self.decoder = MultiScaleDecoder(in_channels=cfg.app_channels * cfg.app_depth,
                                         channels=tuple(cfg.dec_channels),
                                         res_blocks=cfg.dec_res_blocks,
                                         image_channel=4 if cfg.source_blend else 3)
        if cfg.source_blend:
            with torch.no_grad():          # start by copying the warped source (mask ~ 0.98)
                for conv in self.decoder.to_image:
                    conv.bias[3] = 2.0
        self.discriminator = None
        if cfg.w_gan > 0 or cfg.w_fm > 0:
            self.discriminator = MultiScalePatchDiscriminator(PatchDiscriminatorConfig(
                scales=list(cfg.d_scales), block_expansion=cfg.d_block_expansion,
                num_blocks=cfg.d_blocks))
        self.perceptual = None
        if cfg.w_perceptual > 0:
            if cfg.vgg_weights:
                from pyface.nn.vgg import PerceptualLoss
                self.perceptual = PerceptualLoss(weights=cfg.vgg_weights,
                                                 scales=list(PERCEPTUAL_SCALES))
                self.perceptual.requires_grad_(False)
            else:
                warnings.warn("MMFA: model.w_perceptual > 0 but model.vgg_weights is not set; "
                              "the VGG perceptual loss is off (the L1 pyramid stays)")
        self.augment = RandomAffineTPS(cfg.sigma_affine, cfg.sigma_tps)
        self.register_buffer("_lm_weights", landmark_point_weights(cfg.landmark_weights),
                             persistent=False)
        self._lm_warned = False
        self._cam_warned = False
        self._fake = None

    # --- generator-side modules ---------------------------------------------------------
    GENERATOR = ("appearance", "kp_detector", "pose_encoder", "exp_encoder", "exp_decoder",
                 "dense_motion", "decoder", "exp_landmark_head")

    def generator_parameters(self):
        return [p for n in self.GENERATOR if getattr(self, n) is not None
                for p in getattr(self, n).parameters()]

    # --- pieces -------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        if self.hopenet is not None:      # frozen: BatchNorm statistics stay the pretrained ones
            self.hopenet.eval()
        return self

    @torch.no_grad()
    def hopenet_rotation(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, 3, R, R) in [-1, 1] -> (B, 3, 3) keypoint-space rotation from the frozen
        Hopenet (``rotation="hopenet"``)."""
        return self.hopenet.rotation(image.float())

    def rotation_of(self, frame: dict, name: str, batch: int, device) -> torch.Tensor:
        """Keypoint-space rotation (B, 3, 3) of a frame dict (``coeffs`` (B, 257) with
        ``rotation="gt"``, ``image`` (B, 3, R, R) with ``"hopenet"``)."""
        if self.cfg.rotation == "none":
            return torch.eye(3, device=device).expand(batch, 3, 3)
        if self.cfg.rotation == "hopenet":
            return self.hopenet_rotation(images_of(frame, name, self.cfg.resolution))
        coeffs = frame.get("coeffs") if isinstance(frame, dict) else None
        if coeffs is None or coeffs.shape != (batch, 257):
            got = None if coeffs is None else tuple(coeffs.shape)
            raise ValueError(f"batch['{name}']['coeffs']: expected shape ({batch}, 257) "
                             f"(Deep3D angles for model.rotation='gt'), got {got}")
        return deep3d_to_keypoint_rotation(coeffs[:, 224:227].float())

    def scale_translation(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image (B, 3, R, R) -> scale (B,) = exp(.), translation (B, 2)."""
        out = self.pose_encoder(image)
        return out[:, 0].clamp(-3, 3).exp(), out[:, 1:]

    def motion_of(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """image (B, 3, R, R) -> {scale (B,), translation (B, 2), f_exp (B, exp_dim)}."""
        s, t = self.scale_translation(image)
        return {"scale": s, "translation": t, "f_exp": self.exp_encoder(image)}

    def render(self, volume: torch.Tensor, kp_source: torch.Tensor, kp_driving: torch.Tensor,
               source: torch.Tensor | None = None, flow: bool = False) -> dict:
        """volume (B, C, D, h, w); kp_source, kp_driving (B, K, 3); source (B, 3, R, R) in
        [-1, 1], required with ``source_blend`` -> {"images": [coarse..fine] (B, 3, r, r),
        "mask" (B, K+1, D, h, w), "occlusion" (B, 1, h, w), with ``source_blend`` also "blend":
        [coarse..fine] (B, 1, r, r), its pre-activations "blend_logits" (same shapes) and the
        decoder's own finest colour "rgb" (B, 3, R, R); with ``source_blend`` or ``flow`` also
        "flow" (B, h, w, 2), the depth-averaged backward motion (x, y) on the [-1, 1] grid}."""
        blend = self.cfg.source_blend
        if blend and (source is None or source.shape[0] != volume.shape[0]):
            raise ValueError(f"source: expected shape ({volume.shape[0]}, 3, "
                             f"{self.cfg.resolution}, {self.cfg.resolution}) with "
                             f"model.source_blend, got "
                             f"{None if source is None else tuple(source.shape)}")
        dm = self.dense_motion(volume, kp_source=kp_source, kp_driving=kp_driving,
                               return_deformation=blend or flow)
        warped = self.dense_motion.warp(volume, kp_source=kp_source, kp_driving=kp_driving,
                                        mask=dm["mask"])
        occ = dm.get("occlusion_map")
        images, logits = self.decoder(warped, occ, return_logits=True)
        out = {"images": images, "mask": dm["mask"], "occlusion": occ}
        if blend or flow:
            out["flow"] = dm["deformation"][..., :2].mean(1)   # (B, h, w, 2): depth-averaged
        if blend:
            out["rgb"] = images[-1][:, :3]                 # the decoder's own colour
            out["blend_logits"] = [x[:, 3:] for x in logits]
            out["images"], out["blend"] = [], []
            for img in images:
                w = warp_image(source, out["flow"], img.shape[-1])
                m = self.cfg.blend_cap * (img[:, 3:] + 1) / 2
                out["images"].append(m * w + (1 - m) * img[:, :3])
                out["blend"].append(m)
        return out

    def forward(self, source: torch.Tensor, driving: torch.Tensor, rot_source: torch.Tensor,
                rot_driving: torch.Tensor) -> dict:
        """source, driving (B, 3, R, R) in [-1, 1]; rot_source, rot_driving (B, 3, 3) keypoint
        space -> dict: images (list, coarse to fine), kp_canonical (B, K, 3) of the source,
        kp_source / kp_driving (B, K, 3), delta_source / delta_driving (B, K, 3), f_exp
        (B, exp_dim) of the driving, scale / translation of the driving, mask, occlusion."""
        R = self.cfg.resolution
        for name, img in (("source", source), ("driving", driving)):
            if img.dim() != 4 or tuple(img.shape[1:]) != (3, R, R):
                raise ValueError(f"{name}: expected shape (B, 3, {R}, {R}), got "
                                 f"{tuple(img.shape)}")
        B = source.shape[0]
        if driving.shape[0] != B:
            raise ValueError(f"driving: expected batch {B} (the source's), got {driving.shape[0]}")
        for name, r in (("rot_source", rot_source), ("rot_driving", rot_driving)):
            if r.shape != (B, 3, 3):
                raise ValueError(f"{name}: expected shape ({B}, 3, 3), got {tuple(r.shape)}")
        volume = self.appearance(source)
        kc = self.kp_detector(source)["value"]
        both = self.motion_of(torch.cat([source, driving]))
        ms = {k: v[:B] for k, v in both.items()}
        md = {k: v[B:] for k, v in both.items()}
        kc2 = torch.cat([kc, kc])
        delta = self.exp_decoder(both["f_exp"], kc2)
        kp_s = pose_keypoints(kc, rot_source, ms["scale"], ms["translation"], delta[:B])
        kp_d = pose_keypoints(kc, rot_driving, md["scale"], md["translation"], delta[B:])
        out = self.render(volume, kp_s, kp_d, source)
        out.update(kp_canonical=kc, kp_source=kp_s, kp_driving=kp_d, delta_source=delta[:B],
                   delta_driving=delta[B:], f_exp=md["f_exp"], scale=md["scale"],
                   translation=md["translation"])
        return out

    # --- TrainableModel -------------------------------------------------------------------
    def build_optimizers(self):
        c = self.cfg
        opts = {"G": torch.optim.Adam(self.generator_parameters(), lr=c.lr, betas=tuple(c.betas))}
        if self.discriminator is not None:
            opts["D"] = torch.optim.Adam(self.discriminator.parameters(), lr=c.lr_d,
                                         betas=tuple(c.betas))
        return opts

    def phases(self):
        ph = [Phase("G", "G", frozen=("discriminator",) if self.discriminator is not None else ())]
        if self.discriminator is not None:
            ph.append(Phase("D", "D"))
        return ph

    def _inputs(self, batch: dict):
        R = self.cfg.resolution
        src = images_of(batch.get("source"), "source", R)
        drv = images_of(batch.get("driving"), "driving", R)
        B = src.shape[0]
        rs = self.rotation_of(batch["source"], "source", B, src.device)
        rd = self.rotation_of(batch["driving"], "driving", B, src.device)
        return src, drv, rs, rd

    def data_keys(self) -> dict:
        """Item keys a training step reads (checked before training by the engine)."""
        frame = {"image": None, **({"coeffs": None} if self.cfg.rotation == "gt" else {})}
        return {"source": frame, "driving": dict(frame)}

    def step(self, phase: str, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        if phase == "D":
            return self._step_d(batch)
        c = self.cfg
        src, drv, rs, rd = self._inputs(batch)
        B = src.shape[0]
        need_aug = c.w_equivariance > 0 or c.w_exp_consistency > 0
        images = [src, drv]
        if need_aug:
            t = self.augment.sample(B, device=drv.device, dtype=drv.dtype)
            images.append(t.warp_image(drv))
        if c.bn_batches == "separate":
            # one pass of the keypoint detector and the encoders per image set (face-vid2vid's
            # forward passes): BatchNorm normalises each set of B by its own statistics
            outs = [(self.kp_detector(x)["value"], self.motion_of(x)) for x in images]
            kc_all = torch.cat([kc for kc, _ in outs])
            mo = {k: torch.cat([m[k] for _, m in outs]) for k in outs[0][1]}
        else:
            # one pass of the keypoint detector and the encoders over source, driving (and the
            # augmented driving frame) together
            images = torch.cat(images)
            kc_all = self.kp_detector(images)["value"]
            mo = self.motion_of(images)
        kc, kc_d = kc_all[:B], kc_all[B:2 * B]
        f = mo["f_exp"]
        rows = [f[:2 * B]]
        kps = [kc, kc]
        if need_aug:
            rows += [f[B:]]
            kps += [kc_d, kc_all[2 * B:]]
        rows = torch.cat(rows)
        if c.exp_detach:        # the encoder learns from the expression-landmark term only
            rows = rows.detach()
        delta = self.exp_decoder(rows, torch.cat(kps))
        kp_s = pose_keypoints(kc, rs, mo["scale"][:B], mo["translation"][:B], delta[:B])
        kp_d = pose_keypoints(kc, rd, mo["scale"][B:2 * B], mo["translation"][B:2 * B],
                              delta[B:2 * B])
        w_mm = c.w_mouth_motion if ctx is None or ctx.step >= c.mouth_motion_start else 0.0
        lms = (self._landmarks(batch)
               if c.w_landmark > 0 or c.w_exp_landmark > 0 or c.w_mouth > 0
               or w_mm > 0 else None)
        volume = self.appearance(src)
        mm_flow = lms is not None and w_mm > 0 and c.mouth_motion_mode == "flow"
        out = self.render(volume, kp_s, kp_d, src,
                          flow=lms is not None and (c.w_landmark > 0 or mm_flow))
        logs = {}
        loss_lm = src.new_zeros(())
        if lms is not None and c.w_landmark > 0:
            lm = landmark_flow_loss(out["flow"].float(), lms[0], lms[1], c.resolution,
                                    self._lm_weights)
            logs["landmark"] = lm.detach()
            loss_lm = loss_lm + c.w_landmark * lm
        if lms is not None and self.exp_landmark_head is not None:
            pred = self.exp_landmark_head(f[:2 * B].float())
            el = expression_landmark_loss(pred[:B], pred[B:], lms[0], lms[1],
                                          c.exp_landmark_loss)
            logs["exp_landmark"] = el.detach()
            loss_lm = loss_lm + c.w_exp_landmark * el
        if mm_flow:
            # the dense motion once more, with the source's delta at the driving frame's pose
            kp_swap = pose_keypoints(kc, rd, mo["scale"][B:2 * B], mo["translation"][B:2 * B],
                                     delta[:B])
            dm = self.dense_motion(volume, kp_source=kp_s, kp_driving=kp_swap,
                                   return_deformation=True)
            mm = mouth_flow_loss(out["flow"], dm["deformation"][..., :2].mean(1), lms[0],
                                 lms[1], c.resolution)
            logs["mouth_motion"] = mm.detach()
            loss_lm = loss_lm + w_mm * mm
        elif lms is not None and w_mm > 0:
            # the expression's share of the driving keypoints' motion: delta_D against the
            # source's delta_S, both at the driving frame's (detached) pose
            sd, td = mo["scale"][B:2 * B].detach(), mo["translation"][B:2 * B].detach()
            kcd = kc.detach()
            motion = (pose_keypoints(kcd, rd, sd, td, delta[B:2 * B])
                      - pose_keypoints(kcd, rd, sd, td, delta[:B]))[..., :2]
            mm = mouth_motion_loss(motion, kp_d, lms[0], lms[1], c.resolution,
                                   c.mouth_motion_sigma)
            logs["mouth_motion"] = mm.detach()
            loss_lm = loss_lm + w_mm * mm
        n = len(out["images"])
        rec = src.new_zeros(())
        targets = []
        for i, img in enumerate(out["images"]):
            tgt = drv if img.shape[-1] == drv.shape[-1] else F.interpolate(
                drv, size=img.shape[-2:], mode="bilinear", antialias=True, align_corners=False)
            targets.append(tgt)
            rec = rec + l1_pyramid(img.float(), tgt, c.pyramid_levels - (n - 1 - i))
        logs["rec_l1"] = rec.detach()
        loss = c.w_rec * rec
        if lms is not None:
            loss = loss + loss_lm
        final = out["images"][-1]
        if lms is not None and c.w_mouth > 0:
            box = mouth_box_mask(lms[1], final.shape[-1],
                                 c.mouth_margin * final.shape[-1] / 64)
            mouth = masked_l1(final.float(), drv, box)
            logs["mouth_l1"] = mouth.detach()
            if "rgb" in out:        # the decoder's own colour too, whatever the blend mask
                mouth = mouth + masked_l1(out["rgb"].float(), drv, box)
            loss = loss + c.w_mouth * mouth
        if c.source_blend and c.w_blend_bound > 0:
            bound = sum(F.relu(x.float().abs() - c.blend_bound).mean()
                        for x in out["blend_logits"]) / len(out["blend_logits"])
            logs["blend_bound"] = bound.detach()
            loss = loss + c.w_blend_bound * bound
        if self.perceptual is not None:
            if c.perceptual_outputs == "all":     # every output, one scale fewer per coarser one
                per = sum(self.perceptual(img.float(), tgt,
                                          scales=PERCEPTUAL_SCALES[:max(1, len(PERCEPTUAL_SCALES)
                                                                        - (n - 1 - i))])
                          for i, (img, tgt) in enumerate(zip(out["images"], targets)))
            else:
                per = self.perceptual(final.float(), drv)
            logs["perceptual"] = per.detach()
            loss = loss + c.w_perceptual * per
        if self.discriminator is not None:
            fake = self.discriminator(final)
            real = self.discriminator(drv)
            # face-vid2vid's sums: the LSGAN term over the scales, feature matching over the
            # scales and the discriminator's layers (w_fm is the weight of each layer)
            g = sum(gan_g_loss(lg, "lsgan") for _, lg in fake.values())
            fm = sum(feature_matching_loss(real[k][0], fake[k][0]) * len(fake[k][0])
                     for k in fake)
            logs["gan_g"], logs["feature_matching"] = g.detach(), fm.detach()
            loss = loss + c.w_gan * g + c.w_fm * fm
            self._fake = final.detach()
        if c.w_placement > 0:
            cams = self._cameras(batch)
            if cams is not None:
                pl = placement_loss(mo["scale"][:2 * B], mo["translation"][:2 * B], cams)
                logs["placement"] = pl.detach()
                loss = loss + c.w_placement * pl
        canon = (kc_d - kc).abs().mean()
        logs["canonical_l1"] = canon.detach()
        loss = loss + c.w_canonical * canon
        if need_aug:
            # posed keypoints of the driving frame and of its warped copy, each from the frame
            # alone (its own canonical keypoints, scale, translation and expression)
            kp_self = pose_keypoints(kc_d, rd, mo["scale"][B:2 * B],
                                     mo["translation"][B:2 * B], delta[2 * B:3 * B])
            kp_aug = pose_keypoints(kc_all[2 * B:], rd, mo["scale"][2 * B:],
                                    mo["translation"][2 * B:], delta[3 * B:])
            eq = equivariance_loss(kp_self, kp_aug, t)
            if c.exp_consistency_warp == "affine":   # the same warp's affine part alone
                affine = AffineTPS(t.theta, t.control_points, torch.zeros_like(t.control_params))
                f_aug = self.exp_encoder(affine.warp_image(drv))
            else:
                f_aug = f[2 * B:]
            cos = F.cosine_similarity(f[B:2 * B], f_aug, dim=1).mean()
            logs["equivariance"], logs["exp_cos"] = eq.detach(), cos.detach()
            loss = loss + c.w_equivariance * eq + c.w_exp_consistency * (1 - cos)
        prior = keypoint_prior_loss(kp_d, depth=c.kp_prior_depth)
        dl = delta[B:2 * B].abs().mean()
        logs["kp_prior"], logs["delta_l1"] = prior.detach(), dl.detach()
        loss = loss + c.w_prior * prior + c.w_delta * dl
        with torch.no_grad():
            logs["psnr"] = psnr(final.detach().float().clamp(-1, 1), drv).mean()
            logs["scale"] = mo["scale"][B:2 * B].detach().mean()
        logs["loss"] = loss
        return logs

    def _landmarks(self, batch: dict):
        """(source, driving) landmarks (B, 68, 2) in pixels, or None (warned once) when a frame
        lacks them."""
        lms = []
        for name in ("source", "driving"):
            lm = batch[name].get("landmarks")
            if lm is None or lm.dim() != 3 or tuple(lm.shape[1:]) != (68, 2):
                if not self._lm_warned:
                    got = None if lm is None else tuple(lm.shape)
                    warnings.warn(f"MMFA: model.w_landmark, w_exp_landmark, w_mouth or "
                                  f"w_mouth_motion > 0 but "
                                  f"batch['{name}']['landmarks'] is {got}, expected (B, 68, 2); "
                                  f"the landmark terms are off")
                    self._lm_warned = True
                return None
            lms.append(lm.float())
        return lms

    def _cameras(self, batch: dict):
        """The cameras (2B, 25) of source then driving, or None (warned once) when a frame lacks
        them."""
        cams = []
        for name in ("source", "driving"):
            cam = batch[name].get("camera")
            if cam is None or cam.dim() != 2 or cam.shape[1] != 25:
                if not self._cam_warned:
                    got = None if cam is None else tuple(cam.shape)
                    warnings.warn(f"MMFA: model.w_placement > 0 but batch['{name}']['camera'] is "
                                  f"{got}, expected (B, 25); the placement term is off")
                    self._cam_warned = True
                return None
            cams.append(cam)
        return torch.cat(cams)

    def _step_d(self, batch: dict) -> dict[str, torch.Tensor]:
        R = self.cfg.resolution
        drv = images_of(batch.get("driving"), "driving", R)
        if self._fake is None:
            raise RuntimeError("MMFA: the D phase runs after the G phase of the same step")
        real = self.discriminator(drv)
        fake = self.discriminator(self._fake)
        self._fake = None
        d = sum(gan_d_loss(real[k][1], fake[k][1], "lsgan") for k in real)   # over the scales
        return {"loss": d, "gan_d": d.detach()}

    @torch.no_grad()
    def preview(self, batch: dict) -> dict[str, torch.Tensor]:
        src, drv, rs, rd = self._inputs(batch)
        out = self(src, drv, rs, rd)
        return {"source": src, "driving": drv, "output": out["images"][-1].clamp(-1, 1)}

    def preview_video(self, batch: dict, frames: int):
        return None


def warp_image(image: torch.Tensor, flow: torch.Tensor, size: int) -> torch.Tensor:
    """``image`` (B, 3, R, R) resized to ``size`` and sampled at ``flow`` (B, h, w, 2) (x, y) in
    [-1, 1] (identity: an inclusive linspace), upsampled to ``size`` -> (B, 3, size, size)."""
    if image.shape[-1] != size:
        image = F.interpolate(image, size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False)
    grid = F.interpolate(flow.permute(0, 3, 1, 2), size=(size, size), mode="bilinear",
                         align_corners=True).permute(0, 2, 3, 1)
    return F.grid_sample(image, grid.to(image.dtype), mode="bilinear", padding_mode="border",
                         align_corners=True)


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR (B,) in dB of images in [-1, 1] (peak-to-peak 2): (B, 3, H, W) each."""
    mse = (pred - target).square().flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)
