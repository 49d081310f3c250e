"""Which vertices of the built-in head MediaPipe's 68 landmarks (pyface.data.landmarks) land on.

The built-in head's own 68 landmark vertices follow its procedural construction; a detector sees
some of them elsewhere (the stylised nose and jaw differ most). This tool renders synthetic
calibration videos (seed 1000: identities disjoint from the quality measurement's seed 0),
detects MediaPipe's 68 points on every frame, projects every front-facing vertex of the head
with the exact ground-truth coefficients, and picks per landmark the vertex with the smallest
median distance to the detection. It prints the table that
``pyface.data.landmarks.BUILTIN_MEDIAPIPE_68`` holds.

    python tools/calibrate_landmarks.py [--identities 6 --frames 24]
"""
import argparse
import os
import tempfile

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--identities", type=int, default=6)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--seed", type=int, default=1000)
    a = ap.parse_args()
    from pyface.data import format as fmt
    from pyface.data.landmarks import mesh_to_68
    from pyface.data.prepare import MediaPipeFaces, select_track
    from pyface.data.synthetic import SynthConfig, generate
    from pyface.face import MorphableModel
    from pyface.face import cameras as cam
    from pyface.face.morphable import vertex_normals

    m = MorphableModel.builtin()
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "cal")
        generate(root, SynthConfig(identities=a.identities, videos_per_identity=1, frames=a.frames,
                                   resolution=256, seed=a.seed, cross=False, workers=1), progress=False)
        dets, projs, fronts = [], [], []
        for rec in fmt.load_index(root):
            det = MediaPipeFaces(static=False)
            faces = [det.faces(fmt.read_frame(root, rec, i)) for i in range(rec.num_frames)]
            det.close()
            picks = select_track(faces, (256, 256))
            c = torch.from_numpy(fmt.load_coeffs(root, rec))
            with torch.no_grad():
                out = m(c)
                label = m.label_of(c)
                uv, _ = cam.project_label(out["verts"] * cam.BFM_TO_EG3D_SCALE, label)
                fronts.append((vertex_normals(out["verts"], m.faces)[..., 2] > 0.0).all(0))
            for i, p in enumerate(picks):
                if p is None:
                    continue
                dets.append(mesh_to_68(p[0], contour="static"))   # what the fit sees
                projs.append((uv[i] * 256).numpy())
        dets, projs = np.stack(dets), np.stack(projs)                 # (N, 68, 2), (N, V, 2)
        cand = np.nonzero(torch.stack(fronts).all(0).numpy())[0]
        table = []
        for k in range(68):
            d = np.linalg.norm(projs[:, cand] - dets[:, k:k + 1], axis=-1)  # (N, C)
            table.append(int(cand[np.argmin(np.median(d, 0))]))
        d_own = np.linalg.norm(projs[:, m.landmarks.numpy()] - dets, axis=-1).mean()
        d_new = np.linalg.norm(projs[:, table] - dets, axis=-1).mean()
        print(f"# {len(dets)} frames; mean distance to the detections: model landmarks "
              f"{d_own:.2f} px, calibrated {d_new:.2f} px (at 256^2)")
        print(f"BUILTIN_VERTICES = {m.num_vertices}")
        print(f"BUILTIN_MEDIAPIPE_68 = {tuple(table)}")


if __name__ == "__main__":
    main()
