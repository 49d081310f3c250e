# Provenance: reproduces the FID Inception-v3 of pytorch-fid (mseitzer/pytorch-fid, Apache-2.0),
# itself the TensorFlow 2015-12-05 Inception graph of the original FID code (bioinf-jku/TTUR,
# Apache-2.0) on torchvision's Inception3 layout (pytorch/vision, BSD-3-Clause), so that its
# pt_inception-2015-12-05 state dict loads; and the KID estimator of Binkowski et al. 2018.
# Our own implementation, written from the papers and the upstreams' documented behaviour; no
# upstream code is copied. pyface's code is licensed under Apache-2.0 (LICENSE).
"""FID and KID on Inception-v3 pool features, with user-supplied weights.

Protocol (the one of pytorch-fid, the usual PyTorch implementation):

* images ``(B, 3, H, W)`` are resized to 299x299 with bilinear interpolation
  (``align_corners=False``, no antialiasing) and mapped to [-1, 1];
* the FID Inception-v3 (torchvision's layout with the TF graph's differences: average pools in
  the Mixed blocks exclude padding, and the last block's pool branch is a 3x3 max pool) gives the
  2048-d average-pooled features of ``Mixed_7c`` ("pool3");
* FID = ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`` on the features' means and
  covariances (``np.cov``, N - 1), in float64;
* KID = the unbiased MMD^2 with the cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3``,
  averaged over random subsets (Binkowski et al.; defaults as in torch-fidelity and clean-fid:
  100 subsets of at most 1000), usable on small sets where FID is biased.

pyface's images are in [-1, 1], so ``FIDInception`` takes [-1, 1]; pytorch-fid takes [0, 1] and
maps after resizing, which is the same computation (bilinear resizing is affine-equivariant).
Weights: ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's release file), read safely.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pyface.eval.weights import MissingWeightsError, missing_weights_message
from pyface.nn._pretrained import load_into, read_state

FEATURE_DIM = 2048


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3) -> ReLU; keys ``conv.*``, ``bn.*``."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: torch.Tensor) -> torch.Tensor:
    # the TF graph's 3x3 average pool: padding cells are not counted
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg3(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        h, v = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **h)
        self.branch7x7_3 = BasicConv2d(c7, 192, **v)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **v)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **h)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **v)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **h)
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        d = self.branch7x7dbl_1(x)
        for m in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
            d = m(d)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            d,
            self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b = self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            self.branch7x7x3_4(b),
            F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """``pool``: 'avg' (Mixed_7b, padding excluded) or 'max' (Mixed_7c, the TF graph's max)."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        p = _avg3(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
            self.branch_pool(p)], 1)


def _drop_key(k: str) -> str | None:
    # the classifier (fc: 1008 classes in the FID file) and torchvision's auxiliary head are unused
    return None if k.startswith(("fc.", "AuxLogits.")) else k


class FIDInception(nn.Module):
    """x: (B, 3, H, W) in [-1, 1] -> pool3 features (B, 2048) float32.

    Module names and state-dict keys are torchvision's ``Inception3`` ones (``Conv2d_1a_3x3.conv.
    weight``, ``Mixed_5b.branch1x1.bn.running_var`` ...), as in pytorch-fid's weight file.
    ``weights``: path or state dict of ``pt_inception-2015-12-05-6726825d.pth``; ``None`` keeps a
    random initialisation (tests only: a metric needs ``require_weights=False`` for that)."""

    def __init__(self, weights=None, *, require_weights: bool = True, metric: str = "fid"):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, "avg")
        self.Mixed_7c = InceptionE(2048, "max")
        if weights is None or (isinstance(weights, str) and not os.path.exists(weights)):
            if require_weights or weights is not None:
                raise MissingWeightsError(missing_weights_message(metric, weights))
        else:
            self.load(weights)
        self.requires_grad_(False).eval()

    def load(self, weights) -> None:
        """Load pytorch-fid's state dict (path or mapping); ``fc.*`` keys are ignored and
        ``num_batches_tracked`` buffers may be absent."""
        if isinstance(weights, Mapping):
            state, src = dict(weights), "FID Inception state dict"
        else:
            state, src = read_state(str(weights)), str(weights)
        for k, v in self.state_dict().items():
            if k.endswith("num_batches_tracked"):
                state.setdefault(k, v)
        load_into(self, state, source=src, rename=_drop_key)

    def train(self, mode: bool = True):
        return super().train(False)   # a fixed feature extractor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"x: expected shape (B, 3, H, W), got {tuple(x.shape)}")
        x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean((2, 3))

    @torch.no_grad()
    def features(self, images: Iterable[torch.Tensor] | torch.Tensor, *,
                 batch_size: int = 32) -> np.ndarray:
        """images: a (N, 3, H, W) tensor in [-1, 1] or an iterable of such batches ->
        (N, 2048) float64 features (computed on this module's device)."""
        if isinstance(images, torch.Tensor):
            images = images.split(batch_size)
        dev = next(self.parameters()).device
        out = [self(b.to(dev)).double().cpu().numpy() for b in images]
        if not out:
            raise ValueError("images: expected at least one image, got none")
        return np.concatenate(out)


# --------------------------------------------------------------------------------------------
# Statistics (float64 numpy)
# --------------------------------------------------------------------------------------------
def _features(f, name: str) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"{name}: expected features (N >= 2, D), got shape {f.shape}")
    return f


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """features: (N, D) -> mean (D,), covariance (D, D) (unbiased, N - 1), float64."""
    f = _features(features, "features")
    return f.mean(0), np.cov(f, rowvar=False)


def _psd_eigenvalues(w: np.ndarray) -> np.ndarray:
    # eigenvalues below the rounding level of the largest are zero (rank-deficient covariances)
    tol = max(w.max(initial=0.0), 0.0) * len(w) * np.finfo(np.float64).eps
    return np.where(w > tol, w, 0.0)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(_psd_eigenvalues(w))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    mu: (D,), sigma: (D, D) symmetric PSD. ``tr((S1 S2)^(1/2))`` is computed as the sum of the
    square roots of the eigenvalues of the symmetric PSD ``S1^(1/2) S2 S1^(1/2)`` (same spectrum
    as S1 S2), which stays real and finite for singular covariances (N < D) where ``sqrtm`` of
    the product needs pytorch-fid's diagonal offset."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    D = mu1.shape[0] if mu1.ndim == 1 else -1
    for name, v, shape in (("mu1", mu1, (D,)), ("mu2", mu2, (D,)), ("sigma1", s1, (D, D)),
                           ("sigma2", s2, (D, D))):
        if v.shape != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {v.shape}")
    r = _sqrt_psd(s1)
    m = r @ s2 @ r
    tr_covmean = np.sqrt(_psd_eigenvalues(np.linalg.eigvalsh((m + m.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def fid_from_features(real, fake) -> float:
    """real: (N1, D), fake: (N2, D) features -> FID.

    With fewer images than feature dimensions (``max(N1, N2) <= D``, the usual case at 2048),
    computed from the centred features ``X1``, ``X2`` without a D x D eigendecomposition:
    ``S_i = X_i^T X_i / (N_i - 1)``, and the non-zero eigenvalues of ``S1 S2`` are the squared
    singular values of ``X1 X2^T / sqrt((N1 - 1)(N2 - 1))``, so ``tr((S1 S2)^(1/2))`` is that
    matrix's nuclear norm (exact; equal to :func:`frechet_distance` on the statistics)."""
    x, y = _features(real, "real"), _features(fake, "fake")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"fake: expected feature dimension {x.shape[1]}, got {y.shape[1]}")
    if max(len(x), len(y)) > x.shape[1]:
        return frechet_distance(*feature_statistics(x), *feature_statistics(y))
    mu1, mu2 = x.mean(0), y.mean(0)
    x1, x2 = x - mu1, y - mu2
    n1, n2 = len(x) - 1, len(y) - 1
    tr_covmean = np.linalg.svd(x1 @ x2.T / np.sqrt(n1 * n2), compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + (x1 * x1).sum() / n1 + (x2 * x2).sum() / n2 - 2 * tr_covmean)


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of x: (m, D), y: (n, D) with k(a, b) = (a.b / D + 1)^3."""
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
                 + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean())


def kid_from_features(real, fake, *, subsets: int = 100, subset_size: int = 1000,
                      seed: int = 0) -> tuple[float, float]:
    """real: (N1, D), fake: (N2, D) -> (KID mean, std over subsets).

    Each subset draws ``min(subset_size, N1, N2)`` rows of each set without replacement
    (``np.random.default_rng(seed)``); when that is all of both sets, one subset is exact."""
    x, y = _features(real, "real"), _features(fake, "fake")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"fake: expected feature dimension {x.shape[1]}, got {y.shape[1]}")
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"subsets, subset_size: expected >= 1 and >= 2, got {subsets}, "
                         f"{subset_size}")
    n = min(subset_size, len(x), len(y))
    if n == len(x) == len(y):
        return polynomial_mmd2(x, y), 0.0
    rng = np.random.default_rng(seed)
    vals = np.array([polynomial_mmd2(x[rng.choice(len(x), n, replace=False)],
                                     y[rng.choice(len(y), n, replace=False)])
                     for _ in range(subsets)])
    return float(vals.mean()), float(vals.std())
