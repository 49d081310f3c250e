# Provenance: reproduces the semantics of OTAvatar's motion controller (Ma et al. 2023;
# theEricMa/OTAvatar, commit c8c484f, CC BY-NC-SA 4.0; models/controller.py): a PIRenderer-style
# dilated temporal convolution over a 3DMM coefficient window, a weight-tied "5-layer MLP" with a
# shortcut, a (15, 20) coefficient output with a global row, and the QR-orthonormal (512, 20)
# direction codebook. Our own implementation, written from the paper and the documented
# behaviour of the code; no upstream code is copied. pyface's code is licensed under Apache-2.0
# (LICENSE).
"""OTAvatar's motion controller: a 3DMM motion window -> a W+ latent offset."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from pyface.nn.codebook import OrthogonalBasis

__all__ = ["MotionController", "MotionControllerConfig"]


@dataclasses.dataclass(frozen=True)
class MotionControllerConfig:
    """:class:`MotionController`; defaults are OTAvatar's (869,420 parameters).

    Attributes:
        in_channels: coefficients per frame (exp 64 + angles 3 + translation 3 = 70).
        window: frames per window (27: radius 13); the temporal convolutions need
            ``window > (first_kernel - 1) + 2 * dilation * layers``.
        descriptor: width of the temporal descriptor and of the MLP (256).
        first_kernel: kernel of the first Conv1d (7, no padding).
        layers: residual [LeakyReLU, Conv1d(k3, dilation)] layers (3); each crops the residual by
            ``dilation`` on both sides (27 -> 21 -> 15 -> 9 -> 3).
        dilation: of those convolutions (3).
        mlp_layers: applications of the MLP's Linear (5).
        tie_mlp: one Linear applied ``mlp_layers`` times (OTAvatar's code); False: separate
            Linears (1,132,588 parameters at full size).
        num_ws: W+ layers that receive an offset (14).
        directions: codebook size n (20).
        w_dim: latent width (512).
        global_row: the output has ``num_ws + 1`` rows, row 0 added to every other row.
        negative_slope: of every LeakyReLU (0.1).
        init_gain: Xavier-normal gain of the Conv1d / Linear weights (0.02; biases zero).
    """

    in_channels: int = 70
    window: int = 27
    descriptor: int = 256
    first_kernel: int = 7
    layers: int = 3
    dilation: int = 3
    mlp_layers: int = 5
    tie_mlp: bool = True
    num_ws: int = 14
    directions: int = 20
    w_dim: int = 512
    global_row: bool = True
    negative_slope: float = 0.1
    init_gain: float = 0.02


class MotionController(nn.Module):
    """OTAvatar's motion controller.

    ``forward(motion)``: motion (B, in_channels, window) -> delta_w (B, num_ws, w_dim), the
    offset added to the identity latent in W+ (``delta_w = alpha @ Q^T``).
    ``coefficients(motion)``: alpha (B, num_ws, directions).
    ``untie()``: converts a tied MLP into ``mlp_layers`` separate copies (same function).

    State dict: ``first``, ``convs.{i}``, ``mlp.{j}`` (one entry when tied), ``out``,
    ``codebook.weight`` (512, 20).
    """

    def __init__(self, cfg: MotionControllerConfig | None = None, **overrides):
        super().__init__()
        if cfg is None:
            cfg = MotionControllerConfig(**overrides)
        elif overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        self.cfg = c = cfg
        self.out_length = c.window - (c.first_kernel - 1) - 2 * c.dilation * c.layers
        if self.out_length < 1:
            raise ValueError(f"window: expected > {c.window - self.out_length} for first_kernel "
                             f"{c.first_kernel}, {c.layers} layers of dilation {c.dilation}, got "
                             f"{c.window}")
        d = c.descriptor
        self.first = nn.Conv1d(c.in_channels, d, c.first_kernel)
        self.convs = nn.ModuleList(nn.Conv1d(d, d, 3, dilation=c.dilation)
                                   for _ in range(c.layers))
        self.mlp = nn.ModuleList(nn.Linear(d, d)
                                 for _ in range(1 if c.tie_mlp else c.mlp_layers))
        rows = c.num_ws + (1 if c.global_row else 0)
        self.out = nn.Linear(d, rows * c.directions)
        self.codebook = OrthogonalBasis(c.w_dim, c.directions)
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                nn.init.xavier_normal_(m.weight, gain=c.init_gain)
                nn.init.zeros_(m.bias)

    def coefficients(self, motion: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if motion.dim() != 3 or motion.shape[1:] != (c.in_channels, c.window):
            raise ValueError(f"motion: expected shape (B, {c.in_channels}, {c.window}), got "
                             f"{tuple(motion.shape)}")
        s = c.negative_slope
        x = self.first(motion)
        crop = c.dilation
        for conv in self.convs:
            x = x[:, :, crop:-crop] + conv(F.leaky_relu(x, s))
        f = x.mean(dim=2)
        h = f
        for j in range(c.mlp_layers):
            h = F.leaky_relu(self.mlp[j % len(self.mlp)](h), s)
        out = self.out(F.leaky_relu(f + h, s))
        rows = out.view(motion.shape[0], out.shape[1] // c.directions, c.directions)
        if c.global_row:
            rows = rows[:, :1] + rows[:, 1:]
        return rows

    def forward(self, motion: torch.Tensor) -> torch.Tensor:
        return self.codebook(self.coefficients(motion))

    def untie(self) -> None:
        """Separate Linears, each a copy of the tied one (outputs unchanged)."""
        c = self.cfg
        if not c.tie_mlp:
            return
        tied = self.mlp[0]
        copies = []
        for _ in range(c.mlp_layers):
            lin = nn.Linear(tied.in_features, tied.out_features, device=tied.weight.device,
                            dtype=tied.weight.dtype)
            lin.load_state_dict(tied.state_dict())
            copies.append(lin)
        self.mlp = nn.ModuleList(copies)
        self.cfg = dataclasses.replace(c, tie_mlp=False)
