# Provenance: reproduces StyleGAN2's equalised-learning-rate layers and modulated convolution as
# in EG3D (NVlabs/eg3d, commit 7cf1fd1, NVIDIA Source Code License, non-commercial) and
# StyleGAN2-ADA (NVlabs/stylegan2-ada-pytorch, NVIDIA Source Code License). Our own
# implementation, written from the papers and the upstream's documented behaviour; no upstream
# code is copied. pyface's code is licensed under Apache-2.0 (LICENSE).
"""Equalised-learning-rate layers and modulated convolution (StyleGAN2 / EG3D semantics, plain
PyTorch, double-backward safe). Parameter and buffer names match EG3D's released networks so that
converted state dicts load without renaming."""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pyface.nn.resample import setup_filter, upfirdn2d

ACTIVATIONS = {  # name -> (function, default gain)
    "linear": (lambda x: x, 1.0),
    "relu": (F.relu, math.sqrt(2)),
    "lrelu": (lambda x: F.leaky_relu(x, 0.2), math.sqrt(2)),
    "sigmoid": (torch.sigmoid, 1.0),
    "tanh": (torch.tanh, 1.0),
    "softplus": (F.softplus, 1.0),
}


_SLOPES = {"relu": 0.0, "lrelu": 0.2}   # piecewise-linear activations: negative-side slope


def _reference_forced() -> bool:
    from pyface import _backend

    return (_backend._forced or os.environ.get("PYFACE_BACKEND")) == "reference"


class _BiasActOutputSaved(torch.autograd.Function):
    """``clamp(act(x + b) * gain)`` for (leaky) ReLU keeping only its output for the backward:
    with ``gain > 0`` the output's sign is the pre-activation's, so the slope is recovered from
    it (PyTorch's composition keeps the pre-activation too: one more activation-sized tensor per
    layer). The backward is made of differentiable ops on the incoming gradient, so double
    backward (R1) works; the slope itself is piecewise constant, as in the composition."""

    @staticmethod
    def forward(ctx, x, b, slope, gain, clamp, dim):
        if b is not None:
            shape = [1] * x.ndim
            shape[dim] = -1
            x = x + b.to(x.dtype).reshape(shape)
        y = F.leaky_relu(x, slope) if slope else F.relu(x)
        if gain != 1:
            y = y.mul_(gain)
        if clamp is not None and clamp >= 0:
            y = y.clamp_(-clamp, clamp)
        ctx.save_for_backward(y)
        ctx.args = (b is not None, slope, gain, clamp, dim)
        return y

    @staticmethod
    def backward(ctx, gy):
        (y,) = ctx.saved_tensors
        has_b, slope, gain, clamp, dim = ctx.args
        # PyTorch's own (double-differentiable) slope kernels, fed the output: y > 0 iff x > 0
        g = gy * gain if gain != 1 else gy
        gx = (torch.ops.aten.leaky_relu_backward(g, y, slope, False) if slope else
              torch.ops.aten.threshold_backward(g, y, 0))
        if clamp is not None and clamp >= 0:
            gx = torch.where(y.abs() < clamp, gx, 0.0)
        gb = None
        if has_b and ctx.needs_input_grad[1]:
            gb = gx.sum([d for d in range(gx.ndim) if d != dim % gx.ndim])
        return gx, gb, None, None, None, None


def bias_act(x: torch.Tensor, b: torch.Tensor | None = None, act: str = "linear",
             gain: float | None = None, clamp: float | None = None, dim: int = 1) -> torch.Tensor:
    """``clamp(act(x + b) * gain, -clamp, clamp)`` with ``b`` broadcast along ``dim``.

    x: (..., C, ...) with C = ``b.shape[0]`` at ``dim``; b: (C,) or None. When gradients are needed, ReLU / leaky
    ReLU with a positive gain run as one autograd node that keeps only the output (the fused
    path; under ``pyface.ops.use_backend("reference")`` / ``train.backend=reference`` PyTorch's
    composition runs instead, which also keeps the pre-activation)."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act: expected one of {sorted(ACTIVATIONS)}, got {act!r}")
    fn, default_gain = ACTIVATIONS[act]
    g = default_gain if gain is None else gain
    if act in _SLOPES and g > 0 and torch.is_grad_enabled() and (
            x.requires_grad or (b is not None and b.requires_grad)) and not _reference_forced():
        return _BiasActOutputSaved.apply(x, b, _SLOPES[act], float(g), clamp, dim)
    if b is not None:
        shape = [1] * x.ndim
        shape[dim] = -1
        x = x + b.to(x.dtype).reshape(shape)
    x = fn(x)
    if g != 1:
        x = x * g
    if clamp is not None and clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


class FullyConnectedLayer(nn.Module):
    """Linear layer with equalised learning rate: ``weight`` (out, in) is stored / lr_multiplier
    and scaled at run time. x: (..., in) -> (..., out)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation: str = "linear", lr_multiplier: float = 1.0, bias_init: float = 0.0):
        super().__init__()
        self.in_features, self.out_features, self.activation = in_features, out_features, activation
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def effective(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight (out, in) and bias (out,) this layer applies, gains included
        (differentiable; a missing bias is zeros). Fused kernels take these."""
        dtype = dtype or self.weight.dtype
        w = self.weight.to(dtype) * self.weight_gain
        if self.bias is None:
            return w, torch.zeros(self.out_features, dtype=dtype, device=w.device)
        b = self.bias.to(dtype)
        if self.bias_gain != 1:
            b = b * self.bias_gain
        return w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias
        if b is not None:
            b = b.to(x.dtype)
            if self.bias_gain != 1:
                b = b * self.bias_gain
        if self.activation == "linear":
            return F.linear(x, w, b)
        return bias_act(F.linear(x, w), b, act=self.activation, dim=x.ndim - 1)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, act={self.activation}"


def conv2d_resample(x: torch.Tensor, w: torch.Tensor, f: torch.Tensor | None = None, up: int = 1,
                    down: int = 1, padding: int = 0, groups: int = 1,
                    flip_weight: bool = True) -> torch.Tensor:
    """2D convolution with optional FIR up/down-sampling (StyleGAN2's ``conv2d_resample``
    arithmetic, so borders match EG3D's networks too).

    x: (N, C_in, H, W); w: (C_out, C_in/groups, kh, kw). ``flip_weight=True``: cross-correlation
    (``F.conv2d``); ``False``: true convolution. ``up``: transposed convolution with stride
    ``up``, then the filter ``f`` (gain ``up**2``) -> (N, C_out, H*up, W*up) for ``padding =
    kw // 2``. ``down``: filter, then strided convolution -> (N, C_out, H/down, W/down).
    """
    kh, kw = w.shape[-2:]
    if up > 1:
        fw = f.shape[-1]
        p0 = padding + (fw + up - 1) // 2 - (kw - 1)
        p1 = padding + (fw - up) // 2 - (kw - up)
        pt = max(min(-p0, -p1), 0)
        if flip_weight:
            w = w.flip([2, 3])
        O, I = w.shape[:2]
        # conv_transpose2d weights are (in, out / groups, kh, kw)
        wt = w.reshape(groups, O // groups, I, kh, kw).transpose(1, 2).reshape(
            groups * I, O // groups, kh, kw)
        x = F.conv_transpose2d(x, wt, stride=up, padding=pt, groups=groups)
        return upfirdn2d(x, f, padding=[p0 + pt, p1 + pt, p0 + pt, p1 + pt], gain=up * up)
    if not flip_weight:
        w = w.flip([2, 3])
    if down > 1:
        fw = f.shape[-1]
        p0, p1 = padding + (fw - down + 1) // 2, padding + (fw - down) // 2
        if kw == 1 and kh == 1:
            x = upfirdn2d(x, f, down=down, padding=[p0, p1, p0, p1])
            return F.conv2d(x, w, groups=groups)
        x = upfirdn2d(x, f, padding=[p0, p1, p0, p1])
        return F.conv2d(x, w, stride=down, groups=groups)
    return F.conv2d(x, w, padding=padding, groups=groups)


class Conv2dLayer(nn.Module):
    """Conv with equalised lr, optional FIR up/down-sampling, bias + activation, clamp.

    x: (N, in, H, W) -> (N, out, H*up/down, W*up/down)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True,
                 activation: str = "linear", up: int = 1, down: int = 1,
                 resample_filter: Sequence[float] = (1, 3, 3, 1),
                 conv_clamp: float | None = None, lr_multiplier: float = 1.0):
        super().__init__()
        self.activation, self.up, self.down, self.conv_clamp = activation, up, down, conv_clamp
        self.in_channels, self.out_channels = in_channels, out_channels
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.weight_gain = lr_multiplier / math.sqrt(in_channels * kernel_size ** 2)
        self.act_gain = ACTIVATIONS[activation][1]
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size,
                                               kernel_size) / lr_multiplier)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = None if self.bias is None else self.bias.to(x.dtype) * self.bias_gain
        x = conv2d_resample(x, w, self.resample_filter, up=self.up, down=self.down,
                            padding=self.padding, flip_weight=self.up == 1)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, b, act=self.activation, gain=self.act_gain * gain, clamp=clamp)


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, *,
                     demodulate: bool = True, up: int = 1, padding: int = 0,
                     resample_filter: torch.Tensor | None = None,
                     flip_weight: bool = True) -> torch.Tensor:
    """StyleGAN2 modulated (and demodulated) convolution as one grouped conv.

    Args:
        x: (B, I, H, W) input.
        weight: (O, I, k, k) shared weight.
        styles: (B, I) per-sample input-channel scales.
    Returns:
        (B, O, H*up, W*up).
    """
    B, I, H, W = x.shape
    O = weight.shape[0]
    if styles.shape != (B, I):
        raise ValueError(f"styles: expected shape ({B}, {I}), got {tuple(styles.shape)}")
    if B == 0:      # (a grouped conv needs one group at least: the shape of one sample, empty)
        return modulated_conv2d(x.new_zeros(1, I, H, W), weight, styles.new_ones(1, I),
                                demodulate=demodulate, up=up, padding=padding,
                                resample_filter=resample_filter, flip_weight=flip_weight)[:0]
    w = weight.unsqueeze(0) * styles.reshape(B, 1, I, 1, 1)
    if demodulate:
        w = w * (w.square().sum(dim=[2, 3, 4], keepdim=True) + 1e-8).rsqrt()
    x = x.reshape(1, B * I, H, W)
    y = conv2d_resample(x, w.reshape(B * O, I, *weight.shape[2:]).to(x.dtype), resample_filter,
                        up=up, padding=padding, groups=B, flip_weight=flip_weight)
    return y.reshape(B, O, *y.shape[2:])
