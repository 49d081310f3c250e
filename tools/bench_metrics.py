"""Time the weight-dependent metrics (random weights) on CPU: python tools/bench_metrics.py."""
import time

import torch

from pyface.eval.fid import FIDInception
from pyface.eval.identity import CSIM
from pyface.eval.lpips import LPIPS, Backbone
from pyface.nn.arcface import IResNet


def timed(fn) -> float:
    fn()   # warm-up
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    torch.manual_seed(0)
    x, y = torch.rand(2, 8, 3, 256, 256) * 2 - 1
    lm = torch.tensor([[100.0, 110], [156, 110], [128, 140], [105, 175], [150, 175]])
    lm = lm.expand(8, 5, 2)
    fid = FIDInception(require_weights=False)
    lp = LPIPS(Backbone("alex").state_dict())
    cs = CSIM(IResNet("r100").state_dict())
    with torch.no_grad():
        print(f"FID Inception features, 8 images of 256x256: "
              f"{timed(lambda: fid.features(x, batch_size=8)):.1f} s")
        print(f"LPIPS (AlexNet), 8 pairs of 256x256: {timed(lambda: lp(x, y)):.1f} s")
        print(f"CSIM (IResNet-100), 8 pairs: {timed(lambda: cs(x, lm, y, lm)):.1f} s")


if __name__ == "__main__":
    main()
