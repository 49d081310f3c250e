"""What the generator behind OTAvatar can reconstruct at best on held-out frames (an oracle for
``pyface eval otavatar``; docs/models/otavatar-measured.md, "Same-identity margin").

Each evaluated pair's *driving* frame (the target itself) is inverted - W, optionally a W+ pass
and pivotal tuning on that frame - and rendered back at its own camera with its own motion
window. No method that renders through this generator at these latent spaces can do better than
this per-frame fit without tuning the generator on the target, so if the oracle's PSNR sits
below copy-source, beating copy-source is out of reach for the generator, not for the
controller. The pairs are those of ``pyface eval`` (``--protocol same``, the ``moving`` subset,
``--pairs`` of them spread evenly over the set); copy-source is scored on the same pairs.

    python tools/otavatar_oracle.py --eg3d EG3D_RUN HELDOUT [--pairs 24] [--steps 100]
        [--wplus 0] [--pti 0] [--json OUT]
    python tools/otavatar_oracle.py --otavatar OTAVATAR_RUN HELDOUT ...

``--eg3d``: the generator of a ``pyface train eg3d`` run (not fine-tuned by OTAvatar; a
controller of the ``tiny`` preset's size at its initialisation supplies the offset, which the
inversion absorbs); ``--otavatar``: an OTAvatar run's fine-tuned generator and controller.
Prints a JSON summary (PSNR whole / face of the oracle and of copy-source on the same pairs).

    python tools/otavatar_oracle.py --otavatar RUN HELDOUT --pipeline [--cfg KEY=VALUE ...]

``--pipeline`` instead scores the OTAvatar pipeline itself (the source inverted, the driving
frames animated, as ``pyface eval otavatar``) on the same pairs, with ``--cfg`` overriding
fields of its config (e.g. ``pti_steps=300``, ``invert_space=w+``, ``wplus_steps=100``,
``invert_steps=100``): cheap inference-time changes measured against the same copy-source.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


class InversionOracle:
    """A ``pyface eval`` pipeline whose prediction of each driving frame is the frame itself,
    inverted into ``pipe``'s generator and rendered back (see the module docstring)."""

    def __init__(self, pipe, *, steps: int, space: str, pti: int):
        self.pipe, self.steps, self.space, self.pti = pipe, steps, space, pti
        self.resolution = pipe.resolution
        self.device = pipe.device
        self.seconds = 0.0

    def encode_source(self, source: dict):
        return None

    def encode_driving(self, driving: dict) -> dict:
        return driving

    def generate(self, state, driving: dict, **controls) -> torch.Tensor:
        T = int(driving["image"].shape[0])
        outs = []
        t0 = time.perf_counter()
        for t in range(T):
            frame = {k: v[t] for k, v in driving.items()
                     if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == T}
            st = self.pipe.encode_source(frame, steps=self.steps, space=self.space,
                                         pti_steps=self.pti)
            outs.append(self.pipe.generate(st, {"motion": st["motion"],
                                                "camera": frame["camera"][None].float()},
                                           camera="driving"))
        self.seconds += time.perf_counter() - t0
        return torch.cat(outs)


def build_pipeline(args):
    import pyface.models
    from pyface.models.otavatar.model import OTAvatar, OTAvatarConfig
    from pyface.models.otavatar.pipeline import OTAvatarPipeline
    from pyface.train.config import build_experiment

    if args.otavatar:
        pipe = pyface.models.load("otavatar", args.otavatar, device="cpu")
    else:
        cfg = build_experiment("otavatar", OTAvatarConfig, defaults=OTAvatar.presets["tiny"],
                               overrides=[f"model.generator={args.eg3d}",
                                          "model.local_batch=1"]).model_config
        torch.manual_seed(0)
        pipe = OTAvatarPipeline(OTAvatar(cfg).eval(), device="cpu")
    if args.wplus:
        pipe.model.cfg.wplus_steps = args.wplus
    return pipe


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--eg3d", help="a pyface train eg3d run (its generator, not fine-tuned)")
    src.add_argument("--otavatar", help="an OTAvatar run (its fine-tuned generator)")
    p.add_argument("data", help="held-out dataset root (pyface data synth --split test)")
    p.add_argument("--pairs", type=int, default=24, help="moving pairs")
    p.add_argument("--protocol", choices=("same", "cross"), default="same",
                   help="pyface eval's protocol (the oracle needs 'same': the target frame "
                        "is a frame of the source's video only there)")
    p.add_argument("--steps", type=int, default=100, help="W inversion iterations")
    p.add_argument("--wplus", type=int, default=0, help="W+ iterations after W (0: none)")
    p.add_argument("--pti", type=int, default=0, help="pivotal-tuning iterations (0: none)")
    p.add_argument("--pipeline", action="store_true",
                   help="score the pipeline itself (source inverted, driving animated)")
    p.add_argument("--cfg", action="append", default=[], metavar="KEY=VALUE",
                   help="with --pipeline: override a field of the model's config")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from pyface.eval.evaluate import CopySource, evaluate

    torch.manual_seed(0)
    pipe = build_pipeline(args)
    if args.pipeline:
        for kv in args.cfg:
            k, v = kv.split("=", 1)
            old = getattr(pipe.model.cfg, k)
            setattr(pipe.model.cfg, k, v if isinstance(old, str) else type(old)(v)
                    if old is not None else float(v))
        oracle = pipe
    else:
        oracle = InversionOracle(pipe, steps=args.steps, space="w+" if args.wplus else "w",
                                 pti=args.pti)
    kw = dict(protocol=args.protocol, subset="moving", metrics=("psnr", "ssim"),
              max_pairs=args.pairs, detector="none")
    t0 = time.perf_counter()
    res = evaluate(oracle, args.data, **kw).summary("moving")
    seconds = time.perf_counter() - t0
    copy = evaluate(CopySource(pipe.resolution), args.data, **kw).summary("moving")
    out = {"generator": args.eg3d or args.otavatar, "resolution": pipe.resolution,
           "protocol": args.protocol, "pairs": res["count"], "seconds": seconds,
           **({"mode": "pipeline", "cfg": args.cfg} if args.pipeline else
              {"mode": "oracle", "steps": args.steps, "wplus": args.wplus, "pti": args.pti}),
           "model": {k: v for k, v in res.items() if k != "count"},
           "copy_source": {k: v for k, v in copy.items() if k != "count"}}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
