# Provenance: option names and defaults follow OTAvatar (Ma et al., CVPR 2023;
# theEricMa/OTAvatar, commit c8c484f, CC BY-NC-SA 4.0; config/otavatar.yaml and its trainer) as
# documented in shared/reference/specs/otavatar-goha.md section 1. Our own implementation; no
# upstream code is copied. pyface's code is licensed under Apache-2.0 (LICENSE).
"""Configuration of OTAvatar (``pyface train otavatar``): the motion controller, the losses and
the decoupling-by-inverting recipe. Defaults are the paper / reference-code values."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from pyface.nn.render import RenderConfig, check_render_values


@dataclass
class ControllerOptions:
    """:class:`pyface.nn.MotionControllerConfig` fields (``model.controller.*``); ``w_dim`` and
    ``num_ws`` come from the generator. Defaults: OTAvatar's 869,420-parameter controller."""

    window: int = 27
    descriptor: int = 256
    first_kernel: int = 7
    layers: int = 3
    dilation: int = 3
    mlp_layers: int = 5
    tie_mlp: bool = True
    directions: int = 20
    global_row: bool = True
    init_gain: float = 0.02


@dataclass
class OTAvatarConfig:
    """OTAvatar: an EG3D generator (fine-tuned) + motion controller, trained by inverting.

    Attributes:
        generator: the EG3D generator to start from: a ``pyface convert eg3d`` /
            ``pyface convert otavatar`` folder or a ``pyface train eg3d`` run (stage ``eg3d``,
            trained first by ``pyface train otavatar --preset tiny|gpu-short`` when empty).
        controller_init: a ``pyface convert otavatar`` folder whose controller initialises ours
            (None: Xavier init, gain ``controller.init_gain``).
        render: overrides of the generator's :class:`pyface.nn.RenderConfig` fields applied
            after loading it (e.g. ``recompute``, ``chunk_points``, ``backend``: how the
            fused renderer trades memory for time; the sampling fields change the model).
            Empty: the generator's own (the EG3D run's or the converted file's). A trained
            model's samples per ray and execution choices are inference options
            (``render.depth_resolution``, ..., :attr:`OTAvatar.inference_options`), merged
            into the saved overrides at load time.
        controller: controller sizes (:class:`ControllerOptions`).
        local_batch: items per rank (the inverted latents are one row per item: rank-local
            parameters of this many rows). None (default): ``pyface.train`` sets it to
            ``train.batch_size / world size`` (one process: the whole batch); a model built by
            hand needs it set.
        invert_iters: inversion iterations per batch (100); the last ``invert_controller_iters``
            (10) step the controller instead of W and the intrinsics bias, and only they use the
            super-resolved image.
        invert_lr, invert_betas, invert_clip: Adam of W (0.01, (0.9, 0.999), grad-norm clip 1
            over the whole W tensor).
        intrinsics_lr, intrinsics_betas: AdamW (weight decay 0) of the intrinsics bias s, t
            (B, 18): ``K' = K (1 + tanh s) + t`` (0.01, (0.9, 0.9999)).
        controller_lr, controller_betas, controller_wd: AdamW of the controller (1e-3,
            (0.5, 0.999), weight decay 1: the paper's l1 on the controller is this decay).
        generator_lr, generator_betas: Adam of the generator refinement (1e-4, (0.9, 0.9999)).
        clip: grad-norm clip of the controller and generator updates (1).
        center_motion: training subtracts from each frame's controller offset the mean offset
            of its item's K frames (False: the reference adds the raw offset). The shared w
            absorbs a common offset anyway; centring keeps the part of the reconstruction error
            that all frames of a video share (the identity misfit of a short inversion) out of
            the controller's gradient, so the controller cannot learn to fix identities from a
            video's motion signature. Inference is unchanged (w is inverted against the
            source's own offset, so only differences from it act).
        controller_loss: what the controller learns from in training. ``"absolute"`` (the
            reference): each frame's reconstruction loss, in the inversion's controller
            iterations and in the refinement. ``"relative"``: the same loss terms on each
            frame's prediction minus its item's mean prediction plus its item's mean target
            (:func:`pyface.models.otavatar.model.relative_outputs`), so the controller fits the
            difference between the frames of an item (their motion) while an error that all
            of them share (the blur a short inversion leaves) cancels: the inversion's
            controller iterations use it (the item's mean over the K frames rendered together),
            and the refinement updates the controller from it (the item's mean prediction from
            the last controller iteration, detached) and the generator from the reconstruction
            loss, from the same render. Needs ``invert_controller_iters >= 1`` and K >= 2
            frames per item.
        controller_w_mouth: the mouth-RoI weight of the controller's loss (None: ``w_mouth``).
            Set, the controller's terms (the inversion's controller iterations and its
            refinement update) use it while the generator's refinement keeps ``w_mouth``; the
            refinement then updates the controller and the generator from separate losses of
            the same render (as with ``controller_loss=relative``).
        motion_pose: the controller sees the windows' angle and translation rows (64-69)
            (True, the reference). False: they are zeroed before every controller call
            (training, inference, the EMA copy), so only the expression drives the offset and
            the pose acts through the camera alone.
        w_clamp: training clamps ws to ``w_avg +- w_clamp`` (5; None: no clamp); inference never
            clamps.
        w_perceptual, style_weight: VGG19 perceptual loss (relu1_1..relu5_1, L1) and its Gram
            term on the first scale (1, 250); 2 scales on the raw render, 4 on the SR output.
        vgg_weights: torchvision VGG19 file (``pyface convert vgg19``); None: the perceptual term
            is replaced by an image-pyramid L1 (a warning says so once).
        w_smooth_l1: SmoothL1 on the raw render and the SR output (1).
        w_mouth, w_eyes: RoI L1 of the mouth (landmarks 48-67) and of the eyes (36-41, 42-47)
            (10, 10).
        roi_box: "landmarks" (the reference's: each part's landmark bounding box grown by
            int(10/512 H) for the mouth, int(20/512 H) for the eyes, resampled to 120 / 80 bins)
            or "square" (a 120/512 H square around the part's centre with int(10/512 H)
            padding; ``tiny``; a checkpoint saved before these options loads with "square",
            ``raw_terms=False`` and ``inversion_density=False``, the losses it trained with).
        raw_terms: the RoI and identity terms on the raw render in the super-resolved passes
            too (the reference; True), or on the pass's final image only (False: ``tiny``).
        inversion_density: the density regularisers in every training inversion iteration
            too (the reference; True), or in the refinement only (False: ``tiny``).
        inversion_frames: how the training inversion's loss combines the K frames of an item
            rendered together. ``"mean"`` (the default: pyface's earlier training, which
            ``tiny`` keeps and a config or saved run without the key resolves to): every term a
            mean over the B K frames. ``"sum"`` (the reference, set by ``full`` and
            ``gpu-short``): each frame's terms (means over the B items) added over the K
            frames, i.e. K times the mean. Adam is nearly invariant to the scale, so the
            difference acts through the grad-norm clips (``invert_clip`` on W, ``clip`` on the
            controller's iterations), which bind at 1/K of the gradient, and Adam's eps.
        inversion_density_decoder: whose decoder evaluates σ of the EMA generator's planes in
            the training inversion's density terms (``inversion_density``). ``"ema"`` (the
            default: pyface's earlier training, which ``tiny`` keeps and a config or saved run
            without the key resolves to): the EMA generator's, the one that rendered the planes.
            ``"trained"`` (the reference, whose regulariser reads the trained generator; set by
            ``full`` and ``gpu-short``): the trained (non-EMA) generator's decoder, on the same
            planes. The two differ by the EMA's lag of the decoder (not at all on the first
            step, when the copy equals the generator).
        inversion_controller_lr: the controller's learning rate in the training inversion's
            controller iterations. ``"fixed"`` (the default: pyface's earlier training, which
            ``tiny`` keeps and a config or saved run without the key resolves to): its rate
            (``controller_lr`` under ``train.lr_schedule``) in every update. ``"reference"``
            (set by ``full`` and ``gpu-short``): that rate x 100 / ``invert_iters`` in the
            inversion's controller iterations, the rate itself in the refinement (the
            reference's rule: ``controller_lr`` at its 100 iterations, 3.3x it at 30).
        eye_roi_bug: reproduce the reference's eye term (the predicted eye crops are cut from
            the target, so the term is identically zero). Default False: the bug is fixed.
        w_identity, arcface_weights: ArcFace identity loss (1): ResNetArcFace-18 weights (a
            local file, e.g. GFPGAN's ``arcface_resnet18.pth``) on 5-point-aligned grayscale
            128² crops (:mod:`pyface.nn.arcface18`); None disables it (a warning says so once).
        w_monotonic, w_tv, density_points, tv_sigma: density regularisers on each refined
            frame's planes (1, 0.25, 2000 points, sigma 0.004).
        invert_steps, invert_space, wplus_steps: inference inversion (pipeline): W iterations
            (100), and an optional W+ pass of ``wplus_steps`` more (``invert_space="w+"``).
        pti_steps, pti_lr, pti_stop: optional pivotal tuning after the inversion: a copy of the
            generator, Adam ``pti_lr`` (3e-4), at most ``pti_steps`` iterations (0: off; the
            reference: 50) of SmoothL1 on the raw and super-resolved images, stopping once that
            loss is <= ``pti_stop`` (None: run every iteration). With a perceptual metric
            given to the pipeline (``OTAvatarPipeline.pti_metric``, e.g. LPIPS built from
            user weights) the reference's rule applies instead: stop once the metric is <=
            ``pti_stop_metric`` (0.06). The SmoothL1 rule is the fallback without weights.
        drive_pose: the pipeline's driving windows keep their angle and translation rows
            (True, the reference). False: the driving frames' expression rows with the
            source's pose rows, so the controller's offset follows the expression only and the
            driving pose acts through the camera alone.
        inference: the pipeline's inference profile, ``"pyface"`` (default) or
            ``"reference"`` (the reference code's source encoding): the values of the four
            options below where they are None (``pipeline.INFERENCE_PROFILES``).
        inference_clip: the inference inversion clips w's gradient at ``invert_clip`` (pyface:
            true; the reference: false, unclipped), W and W+ passes.
        inference_clamp: the inference inversion and PTI render ws clamped to
            ``w_avg +- w_clamp`` (the reference: true; pyface: false); the animation never
            clamps.
        wplus_keep_intrinsics: the W+ pass starts from the W pass's intrinsics bias (the
            reference: true) instead of 0 (pyface: false).
        pti_mode: ``"pyface"`` (SmoothL1 of the raw and super-resolved images, the stopping
            metric on the super-resolved image, checked before each update) or
            ``"reference"`` (SmoothL1 of the raw render alone, the metric on the raw render
            nearest-upsampled to the target's size, checked after each update).
    """

    generator: str | None = None
    controller_init: str | None = None
    # keys: the RenderConfig fields but plane_axes (a property of the weights), checked when
    # the config is built (pyface.train.config)
    render: dict = field(default_factory=dict,
                         metadata={"keys_of": RenderConfig, "fixed": ("plane_axes",)})
    controller: ControllerOptions = field(default_factory=ControllerOptions)
    local_batch: int | None = None
    invert_iters: int = 100
    invert_controller_iters: int = 10
    invert_lr: float = 0.01
    invert_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    invert_clip: float = 1.0
    intrinsics_lr: float = 0.01
    intrinsics_betas: list[float] = field(default_factory=lambda: [0.9, 0.9999])
    controller_lr: float = 1e-3
    controller_betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    controller_wd: float = 1.0
    generator_lr: float = 1e-4
    generator_betas: list[float] = field(default_factory=lambda: [0.9, 0.9999])
    clip: float = 1.0
    w_clamp: float | None = 5.0
    center_motion: bool = False
    controller_loss: str = "absolute"
    controller_w_mouth: float | None = None
    motion_pose: bool = True
    w_perceptual: float = 1.0
    style_weight: float = 250.0
    vgg_weights: str | None = None
    w_smooth_l1: float = 1.0
    w_mouth: float = 10.0
    w_eyes: float = 10.0
    eye_roi_bug: bool = False
    roi_box: str = "landmarks"
    raw_terms: bool = True
    inversion_density: bool = True
    inversion_frames: str = "mean"
    inversion_density_decoder: str = "ema"
    inversion_controller_lr: str = "fixed"
    w_identity: float = 1.0
    arcface_weights: str | None = None
    w_monotonic: float = 1.0
    w_tv: float = 0.25
    density_points: int = 2000
    tv_sigma: float = 0.004
    invert_steps: int = 100
    invert_space: str = "w"
    wplus_steps: int = 100
    pti_steps: int = 0
    pti_lr: float = 3e-4
    pti_stop: float | None = None
    pti_stop_metric: float = 0.06
    drive_pose: bool = True
    inference: str = "pyface"
    inference_clip: bool | None = None
    inference_clamp: bool | None = None
    wplus_keep_intrinsics: bool | None = None
    pti_mode: str | None = None

    #: the loss options' values for a config without them: a run saved before they existed
    #: trained (and its pipeline inverts sources) with pyface's earlier losses, which ``tiny``
    #: keeps, not the reference's defaults above; such a run is resumed, reused and loaded as it
    #: was trained (:func:`pyface.train.config.saved_config`)
    saved_before: ClassVar[dict[str, Any]] = {"roi_box": "square", "raw_terms": False,
                                              "inversion_density": False}

    def __post_init__(self):
        # the render overrides a trained model may change at load time
        # (OTAvatar.inference_options: render.depth_resolution, ...) are checked here, so a bad
        # value is refused naming its key before anything is read (>= 4 coarse samples with
        # importance samples: checked with the generator's own, by OTAvatar)
        if isinstance(self.render, dict):
            check_render_values(self.render, "model.render")
