"""Configuration of the EG3D model (generator, discriminator, training recipe).

Reproduces the semantics of NVIDIA's EG3D (NVlabs/eg3d, NVIDIA Source Code License,
non-commercial): option names and defaults follow EG3D's ``train.py`` / ``rendering_kwargs``.
The code is pyface's own.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pyface.nn.render import RenderConfig, check_render_values
from pyface.nn.stylegan import NOISE_MODES
from pyface.train.model import check_choice


@dataclass
class EG3DGeneratorConfig:
    """EG3D's ``TriPlaneGenerator``; defaults are the FFHQ 512 configuration.

    Attributes:
        z_dim, c_dim, w_dim: latent, pose-label (25 = cam2world 16 + intrinsics 9) and style widths.
        mapping_layers: mapping depth (EG3D ``--map-depth`` 2).
        backbone_resolution: tri-plane resolution (256); ``plane_channels`` per plane (32).
        channel_base, channel_max: StyleGAN2 widths of the backbone (32768, 512).
        use_noise: per-layer noise inputs in the backbone and the super-resolution.
        decoder_hidden, decoder_features, decoder_lr_mul: OSG decoder (64, 32, 1).
        img_resolution: output size of the super-resolved ``image``.
        neural_rendering_resolution: rendering size when a call does not name one (64; the
            FFHQ-128 checkpoints use 128).
        sr_variant: EG3D super-resolution module (``pyface.nn.stylegan.SR_VARIANTS``) or None
            (``image`` is ``image_raw`` resized to ``img_resolution``).
        sr_antialias, sr_noise_mode: EG3D ``sr_antialias`` and ``superresolution_noise_mode``.
        sr_dtype: ``"float32"`` (default) or ``"bfloat16"`` (GPU switch) for the SR layers.
        sr_conv_clamp: EG3D clamps SR convolutions at 256 (they run in fp16 there); None here.
        sr_input_resolution, sr_block_channels: small-model overrides of EG3D's fixed SR sizes.
        sr_image_raw_alias: return ``image_raw`` as EG3D's code does: its 2X / 4X / Deepfp32
            super-resolution adds its first block's RGB into the rendered RGB in place
            (``img.add_`` on a view of the feature image) when that input is not resized
            (Hybrid2X at 64^2, Hybrid4X / Deepfp32 at 128^2), so EG3D's ``image_raw`` is the
            rendering plus that block's ToRGB output. False (default): ``image_raw`` is the
            rendering (``image`` is the same either way).
        c_scale: the mapping sees ``c * c_scale`` (EG3D's ``rendering_kwargs['c_scale']``).
        c_gen_conditioning_zero: the mapping sees an all-zero pose (``--gen_pose_cond=False``).
        avg_camera_radius, avg_camera_pivot: the orbit used by videos and default cameras.
        render: ray range, samples, box size, plane axes, white background.
    """

    z_dim: int = 512
    c_dim: int = 25
    w_dim: int = 512
    mapping_layers: int = 2
    backbone_resolution: int = 256
    plane_channels: int = 32
    channel_base: int = 32768
    channel_max: int = 512
    use_noise: bool = True
    decoder_hidden: int = 64
    decoder_features: int = 32
    decoder_lr_mul: float = 1.0
    img_resolution: int = 512
    neural_rendering_resolution: int = 64
    sr_variant: str | None = "hybrid8xdc"
    sr_antialias: bool = True
    sr_noise_mode: str = "none"
    sr_dtype: str = "float32"
    sr_conv_clamp: float | None = None
    sr_input_resolution: int | None = None
    sr_block_channels: list[int] | None = None
    sr_image_raw_alias: bool = False
    c_scale: float = 1.0
    c_gen_conditioning_zero: bool = False
    avg_camera_radius: float = 2.7
    avg_camera_pivot: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.2])
    render: RenderConfig = field(default_factory=RenderConfig.ffhq)

    def __post_init__(self):
        # the fields a trained model may change at load time (EG3D.inference_options) are
        # checked here, so a bad value is refused naming its key before anything is read
        check_choice("model.generator.sr_noise_mode", self.sr_noise_mode, NOISE_MODES)
        r = self.render
        if isinstance(r, RenderConfig):
            # (>= 4 coarse samples with importance samples: checked with the saved config, by
            # EG3DGenerator)
            check_render_values({k: getattr(r, k) for k in (
                "depth_resolution_importance", "depth_resolution", "backend", "recompute",
                "chunk_points")}, "model.generator.render")


@dataclass
class EG3DDiscriminatorConfig:
    """EG3D's ``DualDiscriminator`` (StyleGAN2 ResNet D on image ‖ upsampled image_raw)."""

    channel_base: int = 32768
    channel_max: int = 512
    mapping_layers: int = 8          # c -> cmap (EG3D: MappingNetwork with z_dim 0)
    mbstd_group_size: int = 4
    c_noise: float = 0.0             # EG3D --disc_c_noise


@dataclass
class EG3DConfig:
    """``pyface train eg3d``: generator, discriminator and EG3D's training recipe (loss.py,
    training_loop.py); defaults are the FFHQ recipe (batch 32 on 8 GPUs).

    Attributes:
        r1_gamma: R1 weight (loss ``gamma / 2 * |grad|^2`` on image and image_raw).
        d_reg_interval, g_reg_interval: lazy R1 / density regularisation intervals (16, 4).
        g_lr, d_lr, betas: Adam (lr compensated for the lazy phases like EG3D).
        density_reg, density_reg_p_dist, reg_type: density regulariser ('l1',
            'monotonic-detach', 'monotonic-fixed'; None/0 disables it).
        gpc_reg_prob, gpc_reg_fade_kimg: pose-conditioning swap probability, fading from 1.
        blur_init_sigma, blur_fade_kimg: D input blur fading to 0 (kimg; None: 200 * batch / 32).
        neural_rendering_resolution_initial, neural_rendering_resolution_final, *_fade_kimg,
            *_fade_start_kimg: rendering resolution schedule (final None: constant): linear from
            initial to final over fade_kimg starting at fade_start_kimg (EG3D's 128^2
            fine-tune after the 64^2 run starts the fade at the fine-tune's first image).
        mirror: random horizontal flips of real images with mirrored camera labels.
        gen_c_per_phase: the generator's cameras (a permutation of the batch's mirrored labels,
            or a draw from the dataset's with ``gen_c_source="dataset"``) are drawn anew for each phase that runs the generator (``Gmain``, ``Greg``,
            ``Dmain``), as EG3D draws ``gen_c`` for every phase; False (default, the earlier
            training): one permutation shared by the phases of a step.
        gen_c_source: where the generator's cameras come from: ``"batch"`` (default, the
            earlier training): the batch's (mirrored) labels in random order; ``"dataset"``
            (EG3D, which draws ``training_set.get_label(np.random.randint(len(training_set)))``):
            labels drawn uniformly with replacement from every item's camera of the training
            dataset, each mirrored with probability 1/2 with ``mirror`` (EG3D's dataset holds
            every image twice, the second mirrored), so it also renders at cameras no real image
            of the batch has; a drawn camera has no real image (no mask), so the silhouette
            measures (``iou`` ...) then render the generated planes again at the batch's
            cameras, on the steps of the depth measures (every ``measure_every / 5``).
        background: ``"data"`` keeps real images; ``"white"`` composites them over white with
            their masks (pair with ``generator.render.white_back``; makes silhouettes measurable).
        measure_every: steps averaged per line of measurements in the log (silhouette IoU
            against the data masks at the data cameras, its all-opaque baseline, opacity inside /
            outside the masks, D logit gap); 0: none.
    """

    generator: EG3DGeneratorConfig = field(default_factory=EG3DGeneratorConfig)
    discriminator: EG3DDiscriminatorConfig = field(default_factory=EG3DDiscriminatorConfig)
    r1_gamma: float = 1.0
    d_reg_interval: int = 16
    g_reg_interval: int = 4
    g_lr: float = 0.0025
    d_lr: float = 0.002
    betas: list[float] = field(default_factory=lambda: [0.0, 0.99])
    density_reg: float = 0.25
    density_reg_p_dist: float = 0.004
    reg_type: str = "l1"
    gpc_reg_prob: float = 0.5
    gpc_reg_fade_kimg: float = 1000.0
    blur_init_sigma: float = 10.0
    blur_fade_kimg: float | None = None
    neural_rendering_resolution_initial: int = 64
    neural_rendering_resolution_final: int | None = None
    neural_rendering_resolution_fade_kimg: float = 1000.0
    neural_rendering_resolution_fade_start_kimg: float = 0.0
    mirror: bool = True
    gen_c_per_phase: bool = False
    gen_c_source: str = "batch"
    background: str = "data"
    measure_every: int = 50
