"""pyface.nn: trainable modules built on pyface's fused ops, and the model building blocks shared
by the portrait models (plain PyTorch, typed configs; see docs/nn.md)."""
from pyface.nn.arcface import IdentityConfig, IdentityLoss, IResNet
from pyface.nn.augment import (AffineTPS, RandomAffineTPS, equivariance_loss,
                               keypoint_prior_loss)
from pyface.nn.codebook import LearnableTemperature, OrthogonalBasis, info_nce
from pyface.nn.compiling import (COMPILE_CHOICES, CompileOptions, compile_modules, is_compiled,
                                 parse_compile)
from pyface.nn.controller import MotionController, MotionControllerConfig
from pyface.nn.discriminators import (DiscriminatorConfig, DualDiscriminator,
                                      MultiScalePatchDiscriminator, PatchDiscriminatorConfig,
                                      StyleGAN2Discriminator)
from pyface.nn.encoders import (HeadPoseConfig, HeadPoseExpressionEstimator, ResNetConfig,
                                ResNetEncoder)
from pyface.nn.fv2v import (AppearanceConfig, AppearanceFeatureExtractor, CanonicalKeypointDetector,
                            DownBlock2d, KeypointDetectorConfig, MultiScaleDecoder,
                            MultiScaleDecoderConfig, ResBlock2d, ResBlock3d, SameBlock2d,
                            UpBlock2d)
from pyface.nn.face_parser import (FACE_PARSER_CLASSES, FaceParser, FaceParserConfig,
                                   dilate_mask, erode_mask, expression_region_mask,
                                   load_face_parser, region_mask)
from pyface.nn.gfpgan import (GFPGANConfig, GFPGANDiscriminator, GFPGANDiscriminatorConfig,
                              GFPGANv1Clean, gfpgan_config_from_state,
                              gfpgan_discriminator_config_from_state, load_gfpgan,
                              load_gfpgan_discriminator)
from pyface.nn.hopenet import Hopenet, hopenet_key, hopenet_state, load_hopenet
from pyface.nn.layers import Conv2dLayer, FullyConnectedLayer, modulated_conv2d
from pyface.nn.losses import (feature_matching_loss, gan_d_loss, gan_g_loss, kl_divergence,
                              r1_penalty, tv_loss)
from pyface.nn.modnet import MODNet, load_modnet, matte_image
from pyface.nn.motion import (FACE_VID2VID_PI, DenseMotion, DenseMotionConfig, DownBlock3d,
                              Hourglass3d, KeypointTransformConfig, UpBlock3d,
                              euler_to_rotation, headpose_to_degrees, transform_keypoints)
from pyface.nn.render import (OSGDecoder, RenderConfig, RenderOutput, TriplaneRenderer,
                              check_render_values, check_sample_counts,
                              density_l1_regularizer, density_monotonic_regularizer,
                              query_density, ray_uniforms, renderer_uniforms)
from pyface.nn.resample import downsample2d, filtered_resize, upfirdn2d, upsample2d
from pyface.nn.roi import roi_align, roi_l1_loss
from pyface.nn.segformer import (AdaptiveLayerNorm, MiTBlock, MiTConfig, MixTransformer,
                                 SegFormer, config_from_hf, load_hf_segformer, load_segformer,
                                 mit_config)
from pyface.nn.stylegan import (MappingConfig, MappingNetwork, SuperResolution,
                                SuperResolutionConfig, SynthesisConfig, SynthesisNetwork,
                                TriplaneBackbone, TriplaneBackboneConfig)
from pyface.nn.vae import (FeatureDiscriminator, GaussianMLPVAE, VAEConfig, active_dims,
                           kl_warmup)
from pyface.nn.vgg import VGG19, PerceptualConfig, PerceptualLoss
from pyface.nn.vit import (MiTStack, MiTStackConfig, PlainSuperResolution,
                          PlainSuperResolutionConfig)

__all__ = ["IdentityConfig", "IdentityLoss", "IResNet", "AffineTPS", "RandomAffineTPS",
           "equivariance_loss", "keypoint_prior_loss", "LearnableTemperature", "OrthogonalBasis",
           "info_nce", "COMPILE_CHOICES", "CompileOptions", "compile_modules",
           "is_compiled", "parse_compile", "MotionController", "MotionControllerConfig",
           "DiscriminatorConfig",
           "DualDiscriminator", "MultiScalePatchDiscriminator", "PatchDiscriminatorConfig",
           "StyleGAN2Discriminator", "HeadPoseConfig", "HeadPoseExpressionEstimator",
           "ResNetConfig", "ResNetEncoder", "AppearanceConfig", "AppearanceFeatureExtractor",
           "CanonicalKeypointDetector", "DownBlock2d", "KeypointDetectorConfig",
           "MultiScaleDecoder", "MultiScaleDecoderConfig", "ResBlock2d", "ResBlock3d",
           "SameBlock2d", "UpBlock2d", "FACE_PARSER_CLASSES", "FaceParser", "FaceParserConfig",
           "dilate_mask", "erode_mask", "expression_region_mask", "load_face_parser",
           "region_mask", "GFPGANConfig", "GFPGANDiscriminator", "GFPGANDiscriminatorConfig",
           "GFPGANv1Clean", "gfpgan_config_from_state", "gfpgan_discriminator_config_from_state",
           "load_gfpgan", "load_gfpgan_discriminator", "Hopenet", "hopenet_key", "hopenet_state",
           "load_hopenet", "Conv2dLayer", "FullyConnectedLayer", "modulated_conv2d",
           "feature_matching_loss", "gan_d_loss", "gan_g_loss", "kl_divergence", "r1_penalty",
           "tv_loss", "MODNet", "load_modnet", "matte_image", "FACE_VID2VID_PI", "DenseMotion",
           "DenseMotionConfig", "DownBlock3d", "Hourglass3d", "KeypointTransformConfig",
           "UpBlock3d", "euler_to_rotation", "headpose_to_degrees", "transform_keypoints",
           "OSGDecoder", "RenderConfig", "RenderOutput", "TriplaneRenderer",
           "density_l1_regularizer", "density_monotonic_regularizer", "query_density",
           "ray_uniforms", "renderer_uniforms", "check_render_values", "check_sample_counts",
           "downsample2d", "filtered_resize", "upfirdn2d", "upsample2d", "roi_align",
           "roi_l1_loss", "AdaptiveLayerNorm", "MiTBlock", "MiTConfig", "MixTransformer",
           "SegFormer", "config_from_hf", "load_hf_segformer", "load_segformer", "mit_config",
           "MappingConfig", "MappingNetwork", "SuperResolution", "SuperResolutionConfig",
           "SynthesisConfig", "SynthesisNetwork", "TriplaneBackbone", "TriplaneBackboneConfig",
           "FeatureDiscriminator", "GaussianMLPVAE", "VAEConfig", "active_dims", "kl_warmup",
           "VGG19", "PerceptualConfig", "PerceptualLoss", "MiTStack", "MiTStackConfig",
           "PlainSuperResolution", "PlainSuperResolutionConfig"]
