# Provenance: reproduces the architecture and training schedule of GOHA ("Generalizable One-shot
# 3D Neural Head Avatar", NVlabs/GOHA, NVIDIA Source Code License, non-commercial) as described in
# the paper and pyface's design study. Our own implementation; no upstream code is copied.
# pyface's code is licensed under Apache-2.0 (LICENSE).
"""GOHA configuration (``model.*``): one flat dataclass so every field is a ``--set`` key."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pyface.train.model import check_choice

#: GOHA's canonical exemplar pose (Deep3DFaceRecon angles (3,) radians and translation (3,)):
#: frontal, centred; the expression pseudo-render is framed by the BFM-224 camera around it.
EXEMPLAR_ANGLES = (0.0, 0.0, 0.0)
EXEMPLAR_TRANS = (0.0, 0.0, 0.0)


#: the values of the training-difference options (:class:`GOHAConfig`)
TRAINING_CHOICES = {"cano_terms": ("sum", "mean"), "gan_in_coarse": (True, False),
                    "d_fakes": ("g_phase", "tar"), "sr_raw_terms": (False, True),
                    "r1_inputs": ("raw", "input"), "s2_disc_init": ("s1_gan", "gfpgan"),
                    "lift_grad": (False, True), "tar_lift_expression": ("source", "driving")}
#: GOHA's training (its scripts), set by the full and gpu-short presets of every stage; the
#: config defaults (pyface's earlier training, kept by tiny and by runs saved without the keys)
#: differ in each (with "mean", neutral_weight 3 is GOHA's LPIPS weight of the neutral half)
GOHA_TRAINING = {"cano_terms": "mean", "neutral_weight": 3.0, "gan_in_coarse": False,
                 "d_fakes": "tar", "sr_raw_terms": True, "r1_inputs": "input",
                 "s2_disc_init": "gfpgan", "lift_grad": True, "tar_lift_expression": "driving"}
#: the values of the inference-difference options (:class:`GOHAConfig`)
INFERENCE_CHOICES = {"infer_lift_expression": ("source", "driving"),
                     "sr_noise": ("stored", "random")}
#: GOHA's inference (its demo.py / test_celeba_cross.py run the model's forward per driving
#: frame; its GFPUpsampler draws fresh SR noise maps in every call), set by the full and gpu-short presets of every stage and by ``pyface convert goha``;
#: the config default (pyface's earlier inference) is kept by tiny and by saved configs without
#: the key
GOHA_INFERENCE = {"infer_lift_expression": "driving", "sr_noise": "random"}


@dataclass
class GOHAConfig:
    """GOHA stage s1 (canonical, expression and appearance tri-planes; no super-resolution).

    Shapes below use R = ``resolution``; the defaults are GOHA's full scale (R = 512).
    """

    # --- input / encoders -------------------------------------------------------------------
    resolution: int = 512               # R: input image side (must equal data.resolution)
    encoder: str = "b0"                 # MiT size of the three SegFormers ("b0".."b5", "tiny")
    encoder_width: int = 256            # decode-head width D: encoders give (B, D, R/4, R/4)
    segformer_path: str | None = None   # HF SegFormer folder (e.g. segformer-b0 ADE): init
    # --- tri-planes -------------------------------------------------------------------------
    plane_channels: int = 32            # C of every plane; planes (B, 3, C, R/2, R/2)
    embed_width: int = 128              # Embed2Plane hidden width
    plane_gain: float = 1.0             # every branch's planes are multiplied by this (GOHA: 1):
    # with 1, the tiny preset's planes start at std ~0.04 and change by ~lr per step, so the
    # density takes ~1000 steps to take shape (docs/models/goha-measured.md)
    share_upsampler_weights: bool = False   # GOHA's bug: xz / zy planes reuse the xy up-branch
    flip_plane_rows: bool = False       # flip Embed2Plane's output rows: the xy plane's rows run
    # with +y (up), the image's rows down; flipped, the encoders' maps line up with the planes
    plane_field: float | None = None    # half-extent (world units) that Embed2Plane's maps
    # cover: resampled bilinearly into the box's planes (zero outside), so a frontal image's
    # field (about +-0.25 at the head for the synthetic cameras) fills the map instead of its
    # middle half (None: the map covers the whole box, GOHA)
    # --- canonical branch -------------------------------------------------------------------
    mask_regions: list[str] = field(default_factory=lambda: ["brows", "eyes", "mouth", "lips"])
    eye_dilation: int = 7               # square kernel of the eye dilation (0: none)
    eye_dilation_iters: int = 2
    # --- expression branch ------------------------------------------------------------------
    pseudo_render_size: int = 224       # BFM-224 framing; rendered at this size, resized to R
    bfm_path: str | None = None         # Deep3DFaceRecon BFM_model_front.mat; None: built-in
    exemplar_angles: list[float] = field(default_factory=lambda: list(EXEMPLAR_ANGLES))
    exemplar_trans: list[float] = field(default_factory=lambda: list(EXEMPLAR_TRANS))
    data_renders: bool = False          # pseudo-renders, region masks and the neutral render
    # computed per sample in the dataset workers (pyface.models.goha.data; on in tiny); False:
    # in the step, batched, on the training device (six CPU renders per item at R = 256 / 512
    # would need many loader workers to keep up with a GPU step; unmeasured)
    prep_default_backend: bool = True   # 3DMM renders (data preparation) on the default backends
    # --- appearance branch ------------------------------------------------------------------
    lift_resolution: int = 128          # source-view render whose depth is lifted: N = L^2 points
    lift_samples: int = 48              # coarse (= importance) samples of that render
    appearance_erode: int = 7           # erosion kernel of the appearance blend mask
    lift_valid_weight: float | None = None  # fix: only points whose opacity > this (None: all)
    lift_max_distance: float | None = None  # fix: texels farther than this stay empty
    # --- renderer ---------------------------------------------------------------------------
    render_resolution: int = 224        # output side
    depth_samples: int = 48
    depth_samples_importance: int = 48
    ray_start: float = 2.25
    ray_end: float = 3.3
    box_warp: float = 1.0
    render_chunk_points: int | None = None  # samples per chunk of the fused renderer, each
    # recomputed in the backward (None: the op's default, 131072; the tiny preset: 8192, six
    # chunks of its 32^2 x (12 + 12) render at batch 2, 49152 samples)
    render_recompute: bool | Literal["decoder"] = True  # the fused renderer's backward: True
    # recomputes each chunk (sampling, decoder, compositing); "decoder" keeps the sampled plane
    # features (C floats per sample) and recomputes only the decoder and the compositing
    # (faster on CPU)
    decoder_hidden: int = 64
    decoder_features: int = 32          # OSGDecoder feature outputs (GOHA: 1 + 32 = 33)
    # --- s1 schedule ------------------------------------------------------------------------
    canonical_until: int = 120_000      # 'cano' mode only before this step
    expression_from: int = 120_000      # expression plane added from this step
    appearance_from: int = 240_000      # appearance plane added from this step
    # --- losses -----------------------------------------------------------------------------
    l1_weight: float = 1.0
    neutral_weight: float = 1.0         # neutral-render term of the cano mode: x l1 with
    # cano_terms "sum"; with "mean" (GOHA: 3) it weighs only the neutral half's perceptual term
    mask_weight: float = 0.0            # L1 of the render's opacity to the target's matte (0:
    # GOHA; over black, an opaque black fog and empty space look alike, and a composite over a
    # background needs the opacity)
    mouth_weight: float = 0.0           # extra L1 inside the driving frame's mouth + lips
    # (morphable-model regions at the driving camera, mean over the region) in the modes that
    # render the driving frame with the expression plane (tar, coarse; s1 and s1_gan) (0: GOHA;
    # the whole-image L1 gives the mouth ~2 % of the pixels, docs/models/goha.md)
    tv_weight: float = 0.25             # EG3D density TV: |sigma(x) - sigma(x + N(0, tv_sigma))|
    tv_points: int = 1000
    tv_sigma: float = 0.004
    perceptual_weight: float = 0.0      # VGG19 perceptual term, needs vgg_path (LPIPS stand-in)
    vgg_path: str | None = None
    # --- optimiser --------------------------------------------------------------------------
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.0, 0.99])
    # --- stages s1_gan and s2 (pyface.models.goha.stages) ---------------------------------
    s1_checkpoint: str | None = None        # s1 run s1_gan starts from (set by `pyface train`)
    s1_gan_checkpoint: str | None = None    # s1_gan run s2 starts from (set by `pyface train`)
    vgg_weight: float = 1.0             # s1_gan / s2 VGG19 term (GOHA's layer weights); vgg_path
    gan_weight: float = 0.1             # non-saturating logistic GAN term of G
    r1_gamma: float = 10.0
    d_interval: int = 4                 # D update every d_interval steps (s1_gan 4, s2 1)
    r1_interval: int = 16               # lazy R1 every r1_interval steps
    lr_d: float = 1e-4                  # D learning rate (s1_gan 1e-4, s2 5e-4)
    disc_narrow: float = 1.0            # width factor of the StyleGAN2 D (GFPGAN net_d: 1)
    disc_path: str | None = None        # GFPGANv1_net_d.pth / `pyface convert gfpgan-d` folder
    sr_narrow: float = 1.0              # width factor of GFPGANv1Clean (GOHA: 1)
    sr_style_features: int = 512        # GFPGANv1Clean num_style_feat (GOHA: 512)
    sr_path: str | None = None          # GFPGANv1.3 .pth / `pyface convert gfpgan` folder
    sr_residual: bool = False           # the SR image = the render upsampled bilinearly
    # (align_corners=False) + sr_gain x GFPGAN(that upsampling), sr_gain a learned scalar
    # starting at 0, so s2 starts at the bilinear upsampling (GOHA: False, GFPGAN's image
    # itself; on in tiny, where GFPGAN starts from random weights at 1/32 width)
    # --- training differences from GOHA's scripts (docs/models/goha.md, "Training options") 
    # Each default is pyface's earlier behaviour, which the tiny preset keeps and which a config
    # or a saved run without the key resolves to (it trained with it); the full and gpu-short
    # presets set GOHA's (:data:`GOHA_TRAINING`).
    cano_terms: str = "sum"             # cano mode: "sum": neutral_weight x neutral L1 + masked
    # L1 (+ perceptual_weight x (3 x neutral + masked)); "mean" (GOHA): the mean of the two
    # halves, neutral_weight weighs only the neutral half's perceptual term
    gan_in_coarse: bool = True          # s1_gan: the GAN term in every G mode (False, GOHA:
    # only in src / tar)
    d_fakes: str = "g_phase"            # s1_gan / s2 D phase: "g_phase" the fakes and reals of
    # the step's G phase (detached); "tar" (GOHA) a separate no-grad render of the driving
    # frame (mode tar) and its target
    sr_raw_terms: bool = False          # s2: L1 / VGG on the SR image alone (False); True
    # (GOHA): the mean over the SR image and the raw render upsampled as the dual D sees it
    # (against the target downsampled to r and upsampled the same way)
    r1_inputs: str = "raw"              # s2 dual-D R1: "raw" w.r.t. the SR-size real and the
    # real raw at r, before the D's upsampling (EG3D's dual-D R1); "input" (GOHA) w.r.t. the
    # 6-channel D input at R
    s2_disc_init: str = "s1_gan"        # s2's D: "s1_gan" from s1_gan's D (fresh 6-channel
    # first conv); "gfpgan" (GOHA) from GFPGAN's net_d in model.disc_path, s1_gan's D not
    # loaded (without disc_path: s1_gan's D, as "s1_gan")
    lift_grad: bool = False             # appearance branch: the lift render at L^2 under no_grad
    # (False); True (GOHA): its image, fed to E_a, keeps its gradient to the canonical +
    # expression planes and the decoder (the lifted points stay detached: the nearest-point
    # raster has no gradient w.r.t. them)
    tar_lift_expression: str = "source"  # training mode tar with the appearance plane: the lift
    # renders canonical + the source's expression planes, as inference (the avatar encoded once
    # per source); "driving" (GOHA): canonical + the driving expression's planes. Inference
    # (encode_source, forward, the pipeline) follows infer_lift_expression
    # --- inference differences from GOHA's scripts (docs/models/goha.md, "Inference options")
    infer_lift_expression: str = "source"  # inference (GOHA.forward, the pipeline): "source"
    # lifts the canonical + the source's expression planes once per source (the avatar,
    # reused for every driving frame); "driving" (GOHA's demo / test scripts): the appearance
    # planes are lifted again for every driving frame from the canonical + that frame's
    # expression planes (one lift render and one appearance encoding per frame)
    sr_noise: str = "stored"  # s2's super-resolution outside training: "stored" runs
    # GFPGAN's decoder with its stored noise maps (frames independent of the noise); "random"
    # (GOHA's GFPUpsampler, noise=None) with fresh maps per call, drawn before the SR runs from
    # each frame's generator when the pipeline is seeded, else from torch's generator.
    # Training always draws fresh maps

    def __post_init__(self):
        if self.resolution % 4 or self.resolution < 16:
            raise ValueError(f"model.resolution: expected a multiple of 4 >= 16, got "
                             f"{self.resolution}")
        for k in ("plane_channels", "encoder_width", "embed_width", "lift_resolution",
                  "render_resolution", "pseudo_render_size",
                  "depth_samples", "lift_samples"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"model.{k}: expected >= 1, got {getattr(self, k)}")
        if len(self.exemplar_angles) != 3 or len(self.exemplar_trans) != 3:
            raise ValueError("model.exemplar_angles / model.exemplar_trans: expected 3 numbers "
                             f"each, got {self.exemplar_angles} / {self.exemplar_trans}")
        if self.plane_field is not None and not 0 < self.plane_field:
            raise ValueError(f"model.plane_field: expected a half-extent > 0 or None, got "
                             f"{self.plane_field}")
        if len(self.betas) != 2:
            raise ValueError(f"model.betas: expected 2 numbers, got {self.betas}")
        for k in ("d_interval", "r1_interval"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"model.{k}: expected >= 1, got {getattr(self, k)}")
        m = self.depth_samples_importance
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"model.depth_samples_importance: expected an int >= 0 (0: the "
                             f"coarse pass only), got {m!r}")
        c = self.render_chunk_points
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ValueError(f"model.render_chunk_points: expected an int >= 1 or None (the "
                             f"renderer's default), got {c!r}")
        if self.render_recompute not in (True, False, "decoder"):
            raise ValueError(f"model.render_recompute: expected true, false or 'decoder', got "
                             f"{self.render_recompute!r}")
        for k, allowed in {**TRAINING_CHOICES, **INFERENCE_CHOICES}.items():
            check_choice(f"model.{k}", getattr(self, k), allowed)
        if self.perceptual_weight > 0 and not self.vgg_path:
            raise ValueError("model.perceptual_weight > 0 needs model.vgg_path (a torchvision "
                             "VGG19 weights file; nothing is downloaded)")

    @property
    def plane_resolution(self) -> int:
        """Side of the canonical / expression / appearance planes: R / 2."""
        return self.resolution // 2

    @property
    def appearance_plane_resolution(self) -> int:
        """Side A of the lifted appearance planes (R / 4), upsampled x2 by the IDUpsampler."""
        return self.resolution // 4


def check_sample_counts(cfg: GOHAConfig, options=()) -> None:
    """``cfg``'s samples per ray with each other: ``depth_samples >= 4`` when there are
    importance samples (``depth_samples_importance > 0``: the importance pass resamples the
    coarse weights' interior) and ``lift_samples >= 4`` (the lift render takes as many
    importance samples). Otherwise a ValueError naming ``model.KEY`` with both values: with
    ``options`` (the keys set as inference options on a saved config, without ``model.``),
    ``model.depth_samples_importance`` when it was set and ``depth_samples`` was not (the
    saved coarse count is what it does not fit), ``model.depth_samples`` otherwise."""
    n, m = cfg.depth_samples, cfg.depth_samples_importance
    if m > 0 and n < 4:
        if "depth_samples_importance" in options and "depth_samples" not in options:
            raise ValueError(f"model.depth_samples_importance: expected 0 with fewer than 4 "
                             f"coarse samples (depth_samples {n}), got {m}")
        raise ValueError(f"model.depth_samples: expected >= 4 with importance samples "
                         f"(depth_samples_importance {m}), got {n}")
    if cfg.lift_samples < 4:
        raise ValueError(f"model.lift_samples: expected >= 4 (the lift render takes as many "
                         f"importance samples), got {cfg.lift_samples}")
