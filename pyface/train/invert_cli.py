"""``pyface invert``: project an image into a generator's latent space.

The command is the platform's; each generator supplies ``run_invert(args)``, imported only when
the command runs (``pyface --help`` imports no model).
"""
from __future__ import annotations

import importlib

#: model -> "module:function(args) -> exit code" (``args.model_options``: the checked
#: ``--option`` values, ``{field: value}``, or None, for the generator the function builds)
INVERTERS = {"eg3d": "pyface.models.eg3d.cli:run_invert"}
#: model -> "module:function(args)": its option values checked (ValueError naming the option),
#: nothing loaded; run by the inverter too, and alone under ``PYFACE_PARSE_ONLY=1``
INVERT_CHECKS = {"eg3d": "pyface.models.eg3d.cli:check_invert_args"}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "invert", help="project an image into a generator's latent space (EG3D: W / W+)",
        description="Project IMAGE, seen from --camera, into W or W+ of the EMA generator (L1 + "
                    "VGG perceptual loss when --vgg weights are given). Writes the latent "
                    "(safetensors folder), the reconstruction PNG and optionally an orbit mp4; "
                    "prints the loss of the first and the last step and the time per step "
                    "(with --compile, the steps during which a graph compiled apart). --option "
                    "sets the model's inference options for the inversion, e.g. more samples "
                    "per ray: pyface invert eg3d face.png --checkpoint runs/eg3d --option "
                    "generator.render.depth_resolution=96 --option "
                    "generator.render.depth_resolution_importance=96")
    p.add_argument("model", choices=sorted(INVERTERS),
                   help="model: " + ", ".join(sorted(INVERTERS)))
    p.add_argument("image", metavar="IMAGE", help="aligned portrait: an image file (a non-square one is "
                                 "centre-cropped), a video file or folder of images (the first "
                                 "frame) or a pyface video folder (its first frame and camera)")
    p.add_argument("--checkpoint", required=True,
                   help="converted EG3D folder, training checkpoint or run folder")
    p.add_argument("--camera", default=None,
                   help="25 comma-separated floats, 'frontal', a .npy/.json file, or an EG3D "
                        "dataset folder / dataset.json holding the image's label (default: the "
                        "camera of a pyface video folder, else frontal)")
    p.add_argument("--space", default="w+", choices=["w", "w+"],
                   help="w: one latent for every layer; w+ (default): one latent per layer")
    p.add_argument("--steps", type=int, default=300, help="optimisation steps, >= 1 (default "
                                                          "300)")
    p.add_argument("--lr", type=float, default=0.01, help="Adam learning rate, > 0 (default "
                                                         "0.01)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the mean-w samples and the renderer's ray samples, >= 0: on "
                        "CPU the same seed and inputs give the same latent (default 0)")
    p.add_argument("--vgg", default=None, help="VGG19 weights (pyface convert vgg19) for the "
                                              "perceptual term; without: L1 only")
    p.add_argument("--out", default="inversion",
                   help="output folder (default: inversion; created; latent/, reconstruction.png "
                        "and orbit.mp4 in it are replaced)")
    p.add_argument("--video", action="store_true", help="also render an orbit mp4 (48 frames, 24 fps)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if "
                                                 "available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from pyface.train.animate_cli import add_compile_argument, add_option_argument

    add_option_argument(p, "invert")     # recorded in the latent's metadata (options)
    add_compile_argument(p, "the time per step printed leaves out the steps during which a "
                            "graph compiled (and says how long they took); gradients flow "
                            "through the compiled modules to the latent", work="steps",
                         again="the final render and --video's orbit, without gradients, "
                               "compile again",
                         result="The latent and the loss are those of the uncompiled "
                                "generator")
    p.set_defaults(func=run_invert, check=check_invert)


def check_invert(args) -> int:
    """``pyface invert`` under ``PYFACE_PARSE_ONLY=1``: --device (its spelling, whether or not
    this machine has it), --compile, --option (the model's inference options: keys and values)
    and the model's own option values (--steps, --lr, --seed, --out); nothing read or loaded.
    A ValueError names the option (exit code 2); a missing IMAGE or --checkpoint is named as not
    checked."""
    import os
    import sys

    from pyface.train.animate_cli import parse_compile_option, parse_model_options
    from pyface.train.cli import check_device

    check_device(args.device)
    parse_compile_option(getattr(args, "compile", None))
    parse_model_options(args)
    module, fn = INVERT_CHECKS[args.model].split(":")
    getattr(importlib.import_module(module), fn)(args)
    missing = [f"{k} {v}" for k, v in (("IMAGE", args.image), ("--checkpoint", args.checkpoint))
               if v and not os.path.exists(v)]
    if missing:
        print(f"pyface invert: not there yet, so not checked: {', '.join(missing)}",
              file=sys.stderr)
    return 0


def run_invert(args) -> int:
    import sys

    from pyface.train.cli import resolve_device
    from pyface.train.distributed import refuse_under_torchrun

    refused = refuse_under_torchrun(
        "pyface invert", "run the same pyface invert command without torchrun")
    if refused is not None:
        return refused
    from pyface.train.animate_cli import parse_compile_option, parse_model_options

    try:
        args.device = resolve_device(args.device)
        args.compile = parse_compile_option(getattr(args, "compile", None))
        # --option: checked (keys and values) before the image or the checkpoint is read; the
        # inverter builds its generator with them (``args.model_options``, or None)
        args.model_options = parse_model_options(args) or None
    except (KeyError, ValueError) as exc:
        print(f"pyface invert: {str(exc).strip(chr(34))}", file=sys.stderr)
        return 2
    module, fn = INVERTERS[args.model].split(":")
    return getattr(importlib.import_module(module), fn)(args)
