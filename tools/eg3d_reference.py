"""Compare pyface's EG3D generator with NVIDIA's own EG3D code on the same weights and draws.

    PYFACE_EG3D_SRC=/path/to/eg3d-checkout python tools/eg3d_reference.py [--sr all] [--json OUT]

``PYFACE_EG3D_SRC`` (or ``--eg3d``) is a checkout of NVlabs/eg3d (NVIDIA Source Code License,
non-commercial; not part of pyface): its ``eg3d/`` folder holds ``training/``, ``torch_utils/``
and ``dnnlib/``. EG3D's code only runs in a child process (this file started again with
``--child``, the checkout's ``eg3d/`` folder on ``sys.path``); nothing of it is copied into
pyface nor imported into the comparing process. Per super-resolution module EG3D ships:

1. the child builds EG3D's ``TriPlaneGenerator`` on the CPU with small random weights (narrow
   backbone; w_dim 512, which EG3D's SR modules hard-code; every parameter, ``w_avg`` and the
   noise strengths perturbed so that nothing is at its initial value), pickles
   ``{"G_ema": G}`` through EG3D's own ``persistence`` (as its training loop does), and renders
   ``G(z, c, truncation_psi=0.7, noise_mode="const")`` with ``torch.rand`` / ``torch.rand_like``
   recorded (the stratified jitter (B, R, S, 1) and the importance uniforms (B * R, M));
2. this process converts the pickle with ``pyface convert eg3d PKL OUT``, loads it with
   ``pyface.models.load("eg3d", OUT)`` and renders the same z, c with the recorded draws fed as
   ``stratified_noise`` / ``importance_u``;
3. it reports max |difference| of ``image_raw``, ``image`` and ``image_depth`` (and of ``ws``
   and the planes) against the tolerances of issue 13 (float32: image_raw 1e-5, image 1e-4,
   depth 1e-4), and exits 1 when one is exceeded. ``image_raw`` is compared with
   ``sr_image_raw_alias=True`` (EG3D's returned value, which its 2X / 4X / Deepfp32 SR modifies
   in place); ``image_raw_default`` is pyface's default (the rendering), which differs exactly
   where EG3D's in-place add applies.

The configurations are EG3D's ``train.py`` ones: FFHQ (Hybrid8XDC, 512), AFHQ-style 8X (512,
SR noise ``const``), the ShapeNet config (Hybrid2X, 128, white background, 64 + 64 samples,
box 1.6, no pose conditioning), Hybrid4X (256) and the legacy Deepfp32 (256; EG3D's current
``TriPlaneGenerator`` cannot construct it, so it is swapped in after construction, as old
pickles hold it). ``tests/test_eg3d_reference.py`` runs this when ``PYFACE_EG3D_SRC`` is set.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import types

TOLERANCES = {"image_raw": 1e-5, "image": 1e-4, "image_depth": 1e-4}

_FFHQ = dict(depth_resolution=48, depth_resolution_importance=48, ray_start=2.25, ray_end=3.3,
             box_warp=1, avg_camera_radius=2.7, avg_camera_pivot=[0, 0, 0.2])
_SHAPENET = dict(depth_resolution=64, depth_resolution_importance=64, ray_start=0.1,
                 ray_end=2.6, box_warp=1.6, white_back=True, avg_camera_radius=1.7,
                 avg_camera_pivot=[0, 0, 0])

# name -> (EG3D SR class, img_resolution, rendering kwargs on top of the common ones,
#          neural rendering resolution, camera radius)
CASES = {
    "hybrid8xdc": ("SuperresolutionHybrid8XDC", 512, dict(_FFHQ), 64, 2.7),
    "hybrid8x": ("SuperresolutionHybrid8X", 512,
                 dict(_FFHQ, avg_camera_pivot=[0, 0, -0.06], superresolution_noise_mode="const",
                      c_scale=0.5), 64, 2.7),
    "hybrid4x": ("SuperresolutionHybrid4X", 256, dict(_FFHQ, decoder_lr_mul=0.5), 128, 2.7),
    "hybrid2x": ("SuperresolutionHybrid2X", 128,
                 dict(_SHAPENET, c_gen_conditioning_zero=True), 64, 1.7),
    "hybriddeepfp32": ("SuperresolutionHybridDeepfp32", 256, dict(_FFHQ), 64, 2.7),
}


def rendering_kwargs(case: str) -> dict:
    sr_class, img_res, extra, _, _ = CASES[case]
    rk = {"image_resolution": img_res, "disparity_space_sampling": False,
          "clamp_mode": "softplus",
          "superresolution_module": f"training.superresolution.{sr_class}",
          "c_gen_conditioning_zero": False, "gpc_reg_prob": 0.5, "c_scale": 1.0,
          "superresolution_noise_mode": "none", "density_reg": 0.25,
          "density_reg_p_dist": 0.004, "reg_type": "l1", "decoder_lr_mul": 1.0,
          "sr_antialias": True}
    rk.update(extra)
    return rk


# ---------------------------------------------------------------------------------------------
# Child: EG3D's code (run with the checkout's eg3d/ folder first on sys.path)
# ---------------------------------------------------------------------------------------------

def _child(case: str, work: str) -> None:
    if "requests" not in sys.modules:        # dnnlib.util imports it; only URL helpers use it
        try:
            import requests  # noqa: F401
        except ImportError:
            sys.modules["requests"] = types.ModuleType("requests")
    import pickle

    import torch
    import dnnlib  # noqa: F401  (EG3D's)
    from training.triplane import TriPlaneGenerator

    inputs = torch.load(os.path.join(work, "inputs.pt"), weights_only=True)
    sr_class, img_res, _, nrr, _ = CASES[case]
    rk = rendering_kwargs(case)
    torch.manual_seed(inputs["seed"])
    build_rk = dict(rk)
    if case == "hybriddeepfp32":  # EG3D passes sr_antialias, which Deepfp32 does not take
        build_rk["superresolution_module"] = "training.superresolution.SuperresolutionHybrid4X"
    G = TriPlaneGenerator(z_dim=inputs["z"].shape[1], c_dim=25, w_dim=512,
                          img_resolution=img_res, img_channels=3, sr_num_fp16_res=0,
                          mapping_kwargs={"num_layers": 2}, rendering_kwargs=build_rk,
                          sr_kwargs={"channel_base": 2048, "channel_max": 64,
                                     "fused_modconv_default": "inference_only"},
                          channel_base=2048, channel_max=64, num_fp16_res=0, conv_clamp=None,
                          fused_modconv_default="inference_only")
    if case == "hybriddeepfp32":
        from training.superresolution import SuperresolutionHybridDeepfp32

        G.superresolution = SuperresolutionHybridDeepfp32(channels=32, img_resolution=img_res,
                                                          sr_num_fp16_res=0)
        G.rendering_kwargs = dict(rk)
    G.neural_rendering_resolution = nrr
    with torch.no_grad():
        for name, p in G.named_parameters():
            scale = float(p.abs().mean()) if p.numel() > 1 else 1.0
            if name.endswith("noise_strength"):
                p.copy_(torch.randn_like(p) * 0.2)
            else:
                p.add_(torch.randn_like(p) * 0.1 * (scale + 1e-2))
        G.backbone.mapping.w_avg.copy_(torch.randn_like(G.backbone.mapping.w_avg))
    G = G.eval().requires_grad_(False)
    with open(os.path.join(work, "network.pkl"), "wb") as f:
        pickle.dump({"G_ema": G}, f)

    draws = []
    rand, rand_like = torch.rand, torch.rand_like

    def rec_rand(*a, **k):
        t = rand(*a, **k)
        draws.append(("rand", t.clone()))
        return t

    def rec_rand_like(*a, **k):
        t = rand_like(*a, **k)
        draws.append(("rand_like", t.clone()))
        return t

    torch.rand, torch.rand_like = rec_rand, rec_rand_like
    try:
        with torch.no_grad():
            ws = G.mapping(inputs["z"], inputs["c"], truncation_psi=inputs["psi"])
            planes = G.backbone.synthesis(ws, noise_mode="const")
            out = G.synthesis(ws, inputs["c"], noise_mode="const")
    finally:
        torch.rand, torch.rand_like = rand, rand_like
    kinds = [k for k, _ in draws]
    if kinds != ["rand_like", "rand"]:
        raise RuntimeError(f"expected EG3D to draw rand_like (stratified) then rand "
                           f"(importance) in G.synthesis, got {kinds}")
    torch.save({"ws": ws, "planes": planes, "image": out["image"], "image_raw": out["image_raw"],
                "image_depth": out["image_depth"], "stratified": draws[0][1],
                "importance": draws[1][1]}, os.path.join(work, "eg3d_out.pt"))


# ---------------------------------------------------------------------------------------------
# Parent: pyface
# ---------------------------------------------------------------------------------------------

def _inputs(case: str, batch: int, seed: int) -> dict:
    import torch

    from pyface.face import cameras as cams

    g = torch.Generator().manual_seed(seed)
    radius = CASES[case][4]
    yaw = (torch.rand(batch, generator=g) - 0.5) * 0.8
    pitch = (torch.rand(batch, generator=g) - 0.5) * 0.4
    c2w = cams.orbit_camera(yaw, pitch, radius=radius, pivot=(0.0, 0.0, 0.2))
    K = cams.intrinsics_from_focal(cams.FFHQ_FOCAL).expand(batch, 3, 3)
    return {"z": torch.randn(batch, 32, generator=g), "c": cams.make_label(c2w, K),
            "psi": 0.7, "seed": seed}


def compare(case: str, eg3d_src: str, *, batch: int = 2, seed: int = 0,
            work: str | None = None) -> dict:
    """Run EG3D's generator and pyface's converted copy on the same inputs; returns max |diff|
    per output, the tolerances and the timings."""
    import torch

    import pyface.models
    from pyface.cli import main as pyface_main

    eg3d_src = os.path.abspath(eg3d_src)
    root = eg3d_src if os.path.isdir(os.path.join(eg3d_src, "training")) else \
        os.path.join(eg3d_src, "eg3d")
    if not os.path.isfile(os.path.join(root, "training", "triplane.py")):
        raise FileNotFoundError(f"eg3d_src: expected an NVlabs/eg3d checkout (with "
                                f"eg3d/training/triplane.py), got {eg3d_src!r}")
    own = tempfile.TemporaryDirectory() if work is None else None
    work = os.path.abspath(work or own.name)
    os.makedirs(work, exist_ok=True)
    torch.save(_inputs(case, batch, seed), os.path.join(work, "inputs.pt"))
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS",
                                                                           "1"))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", case, work],
                          env=env, cwd=root, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"EG3D's code failed for {case}:\n{proc.stderr[-4000:]}")
    t_eg3d = time.perf_counter() - t0
    ref = torch.load(os.path.join(work, "eg3d_out.pt"), weights_only=True)
    inputs = torch.load(os.path.join(work, "inputs.pt"), weights_only=True)
    out_dir = os.path.join(work, "converted")
    if pyface_main(["convert", "eg3d", os.path.join(work, "network.pkl"), out_dir]) not in (0,
                                                                                          None):
        raise RuntimeError(f"pyface convert eg3d failed for {case}")
    t0 = time.perf_counter()
    G = pyface.models.load("eg3d", out_dir, device="cpu").G
    B, R, S = ref["stratified"].shape[:3]
    noise = ref["stratified"].reshape(B, R, S)
    u = ref["importance"].reshape(B, R, -1)
    G.cfg.sr_image_raw_alias = True      # EG3D's returned image_raw (see EG3DGeneratorConfig)
    with torch.no_grad():
        ws = G.mapping(inputs["z"], inputs["c"], truncation_psi=inputs["psi"])
        out = G.synthesis(ws, inputs["c"], noise_mode="const", stratified_noise=noise,
                          importance_u=u)
        G.cfg.sr_image_raw_alias = False     # pyface's default: the rendering itself
        raw = G.synthesis(ws, inputs["c"], stratified_noise=noise, importance_u=u,
                          planes=out["planes"], sr=False)["image_raw"]
    t_pyface = time.perf_counter() - t0
    planes = out["planes"].reshape(ref["planes"].shape)
    diffs = {"ws": (ws - ref["ws"]).abs().max().item(),
             "planes": (planes - ref["planes"]).abs().max().item()}
    for k in TOLERANCES:
        diffs[k] = (out[k] - ref[k]).abs().max().item()
    # pyface's default image_raw differs from EG3D's by the SR's in-place add only
    diffs["image_raw_default"] = (raw - ref["image_raw"]).abs().max().item()
    r = int(G.rendering_resolution)
    return {"case": case, "sr_class": CASES[case][0], "batch": B,
            "neural_rendering_resolution": r, "samples": [S, u.shape[-1]],
            "image_resolution": list(out["image"].shape[-2:]),
            "max_abs_diff": diffs,
            "value_range": {k: float(ref[k].abs().max()) for k in TOLERANCES},
            "ok": all(diffs[k] <= tol for k, tol in TOLERANCES.items()),
            "seconds": {"eg3d": round(t_eg3d, 1), "pyface": round(t_pyface, 1)}}


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--child"]:
        _child(argv[1], argv[2])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eg3d", default=os.environ.get("PYFACE_EG3D_SRC"),
                    help="NVlabs/eg3d checkout (default: $PYFACE_EG3D_SRC)")
    ap.add_argument("--sr", default="all", help=f"comma-separated of {sorted(CASES)} or all")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not args.eg3d:
        ap.error("no EG3D checkout: set PYFACE_EG3D_SRC or pass --eg3d")
    cases = sorted(CASES) if args.sr == "all" else args.sr.split(",")
    bad = [c for c in cases if c not in CASES]
    if bad:
        ap.error(f"--sr: unknown {bad}; expected {sorted(CASES)}")
    results = []
    for case in cases:
        res = compare(case, args.eg3d, batch=args.batch, seed=args.seed)
        d = res["max_abs_diff"]
        print(f"{case:15s} {res['sr_class']:30s} image_raw {d['image_raw']:.2e}  "
              f"image {d['image']:.2e}  image_depth {d['image_depth']:.2e}  ws {d['ws']:.2e}  "
              f"planes {d['planes']:.2e}  (default image_raw {d['image_raw_default']:.2e})  "
              f"{'ok' if res['ok'] else 'OVER TOLERANCE'}  "
              f"({res['seconds']['eg3d']} s EG3D, {res['seconds']['pyface']} s pyface)",
              flush=True)
        results.append(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tolerances": TOLERANCES, "results": results}, f, indent=1)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
