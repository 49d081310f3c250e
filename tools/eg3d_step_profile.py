"""Where the memory and time of an EG3D training step go, on fused vs reference ops.

    python tools/eg3d_step_profile.py [--preset tiny] [--set KEY=VALUE ...] [--reps 10]

For each of fused ops (the default backends) and reference ops (``train.backend=reference``):

* the peak memory of each phase (``Gmain``, ``Greg``, ``Dmain``, ``Dreg``: forward + backward,
  above what was allocated before; CPU: the profiler's allocator events, as
  ``python -m pyface.bench.train``);
* the generator step ``Gmain`` in pieces: memory kept for the backward after the mapping, the
  tri-plane backbone, the rendering, the super-resolution and the dual discriminator, and each
  piece's transient peak;
* the rendering alone (B = batch, the preset's rays and samples): median forward and backward
  time, also with the fused renderer's recomputation off (``render.recompute=false``).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F


def _mem(fn):
    """fn() -> (result, peak MB, MB still allocated at the end), CPU allocator events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return out, peak / 2**20, cur / 2**20


def profile_step(preset: str, overrides: list[str], reps: int) -> dict:
    from pyface.ops.render import ray_bundle
    from pyface.train import Trainer
    from pyface.train.config import build_experiment
    from pyface.train.model import StepContext
    from pyface.train.registry import model_class

    cls = model_class("eg3d")
    tmp = tempfile.mkdtemp(prefix="pyface-eg3d-profile-")
    report, renders = {}, {}
    for label, backend in (("fused", "null"), ("reference", "reference")):
        cfg = build_experiment("eg3d", cls.Config, defaults=cls.recipe, preset=preset, overrides=[
            f"train.run_dir={tmp}/{label}", "train.progress=false", "train.tensorboard=false",
            "train.device=cpu", f"train.backend={backend}", *overrides])
        tr = Trainer(cfg)
        batch = tr.preview_batch(tr.local_batch)
        tr.train_step(batch)
        m, G = tr.model, tr.model.G
        B = batch["image"].shape[0]
        phases = {}
        for ph in ("Gmain", "Greg", "Dmain", "Dreg"):
            def run():
                with tr._backend():
                    ctx = StepContext(step=16, images_seen=16 * B, batch_size=B, phase=ph)
                    m.step(ph, batch, ctx)["loss"].backward()
            phases[ph] = round(_mem(run)[1], 2)
            m.zero_grad(set_to_none=True)
        m._set_trainable("Gmain")
        res = int(G.rendering_resolution)
        pieces = {}
        with tr._backend():
            c = batch["camera"].float()
            z = torch.randn(B, G.cfg.z_dim)
            ws, *pieces["mapping"] = _mem(lambda: G.mapping(z, c))
            planes, *pieces["backbone"] = _mem(lambda: G.backbone.planes(ws))
            o, d = ray_bundle(c, res)
            ro, *pieces["rendering"] = _mem(lambda: G.renderer(planes, G.decoder, o, d))
            im = ro.images(res)
            img, *pieces["superresolution"] = _mem(
                lambda: G.superresolution(im["image_raw"], im["feature_image"], ws))
            logits, *pieces["D"] = _mem(lambda: m.run_D(img, im["image_raw"], c, 0.0))
            _, peak, _ = _mem(lambda: F.softplus(-logits).mean().backward())
            pieces["backward"] = (peak, 0.0)
        m.zero_grad(set_to_none=True)
        report[label] = {"phase_peak_mb": phases,
                         "gmain_pieces_mb": {k: {"kept": round(v[1], 2), "peak": round(v[0], 2)}
                                             for k, v in pieces.items()}}
        renders[label] = (tr, G, planes.detach(), o, d)
    # rendering alone, the variants interleaved rep by rep (machine load hits them alike)
    variants = [("fused", None), ("fused", False), ("reference", None)]
    times = {v: ([], []) for v in variants}
    for i in range(reps + 2):
        for label, recompute in variants:
            tr, G, planes, o, d = renders[label]
            rc = G.renderer.config
            keep = rc.recompute
            if recompute is not None:
                rc.recompute = recompute
            p = planes.clone().requires_grad_(True)
            with tr._backend():
                t0 = time.perf_counter()
                out = G.renderer(p, G.decoder, o, d)
                t1 = time.perf_counter()
                (out.features.square().sum() + out.depth.sum()).backward()
                t2 = time.perf_counter()
            rc.recompute = keep
            if i >= 2:
                times[(label, recompute)][0].append(t1 - t0)
                times[(label, recompute)][1].append(t2 - t1)
    for (label, recompute), (fw, bw) in times.items():
        report[label].setdefault("render_time", {})[
            "no recompute" if recompute is False else "default"] = {
            "forward_ms": round(statistics.median(fw) * 1e3, 1),
            "backward_ms": round(statistics.median(bw) * 1e3, 1)}
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    rep = profile_step(args.preset, args.set, args.reps)
    for label, r in rep.items():
        print(f"{label}: phase peaks (MB) {r['phase_peak_mb']}")
        print("  Gmain pieces, MB kept for the backward [transient peak]: " + ", ".join(
            f"{k} {v['kept']:.2f} [{v['peak']:.2f}]" for k, v in r["gmain_pieces_mb"].items()))
        print("  rendering alone: " + ", ".join(
            f"{k}: forward {v['forward_ms']} ms, backward {v['backward_ms']} ms"
            for k, v in r["render_time"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
