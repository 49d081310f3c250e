"""pyface.nn.compiling: the opt-in torch.compile of named submodules, in place."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pyface.nn import (OSGDecoder, RenderConfig, TriplaneRenderer, compile_modules, is_compiled,
                       parse_compile)
from pyface.nn.compiling import COMPILE_CHOICES, CompileOptions
from pyface.testing import assert_close

needs_cpp = pytest.mark.cpp


class _Renders(nn.Module):
    """A tri-plane decoder and renderer: the fused render op inside a compiled forward."""

    def __init__(self):
        super().__init__()
        self.decoder = OSGDecoder(8, 16, 4)
        self.renderer = TriplaneRenderer(RenderConfig(depth_resolution=6,
                                                      depth_resolution_importance=4,
                                                      plane_axes="eg3d"))
        self.head = nn.Linear(4, 3)
        self.optional = None

    def forward(self, planes, o, d, noise, u):
        out = self.renderer(planes, self.decoder, o, d, stratified_noise=noise, importance_u=u)
        return self.head(out.features) + out.depth


def _inputs(B=2, res=4):
    from pyface.ops import ray_bundle

    g = torch.Generator().manual_seed(0)
    planes = torch.randn(B, 3, 8, 16, 16, generator=g, requires_grad=True)
    m = torch.eye(4)
    m[1, 1], m[2, 2], m[2, 3] = -1.0, -1.0, 2.7  # at z = 2.7 looking down -z
    k = torch.tensor([4.2647, 0, 0.5, 0, 4.2647, 0.5, 0, 0, 1])
    o, d = ray_bundle(torch.cat([m.flatten(), k]).expand(B, 25).clone(), res)
    return (planes, o, d, torch.rand(B, res * res, 6, generator=g),
            torch.rand(B, res * res, 4, generator=g))


def test_parse_compile_values():
    assert parse_compile(None) is None and parse_compile(False) is None
    for off in ("off", "none", "False", ""):
        assert parse_compile(off) is None
    assert parse_compile(True) == CompileOptions() == parse_compile("on")
    assert parse_compile("max-autotune") == CompileOptions(mode="max-autotune")
    assert parse_compile("aot_eager") == CompileOptions(backend="aot_eager", mode=None)
    assert parse_compile("aot_eager").describe() == "aot_eager"
    assert [parse_compile(v).choice for v in COMPILE_CHOICES[1:]] == list(COMPILE_CHOICES[1:])
    assert parse_compile("default").describe() == "inductor (default)"
    assert COMPILE_CHOICES[0] == "off"
    with pytest.raises(ValueError, match=r"train\.compile: expected one of off, default.*got 'fast'"):
        parse_compile("fast", what="train.compile")
    with pytest.raises(ValueError, match="got 3 of type int"):
        parse_compile(3)


def test_compile_modules_names_and_errors():
    m = _Renders()
    keys = list(m.state_dict())
    assert compile_modules(m, ["decoder", "head"], "off") == []
    assert not is_compiled(m.decoder)
    # an optional part left out (None) is skipped; the others compile in place
    assert compile_modules(m, ["decoder", "optional", "renderer"], "eager") == ["decoder", "renderer"]
    assert is_compiled(m.decoder) and is_compiled(m.renderer) and not is_compiled(m.head)
    assert list(m.state_dict()) == keys
    # compiled already: left as it is
    assert compile_modules(m, ["decoder"], "eager") == []
    with pytest.raises(ValueError, match=r"_Renders has no submodule 'backbone'.*children: "
                                         r"decoder, renderer, head"):
        compile_modules(m, ["backbone"], "eager")
    with pytest.raises(ValueError, match=r"_Renders has no submodule 'decoder.nope'"):
        compile_modules(m, ["decoder.nope"], "eager")
    # torch's own forward (nn.Linear, nn.Sequential): Module.compile would not trace it
    with pytest.raises(ValueError, match=r"_Renders.head is a Linear, whose forward is torch's "
                                         r"own \(torch.nn.modules.linear\)"):
        compile_modules(m, ["head"], "eager")
    with pytest.raises(ValueError, match=r"is a Sequential, whose forward is torch's own"):
        compile_modules(m, ["decoder.net"], "eager")
    with pytest.raises(TypeError, match="sequence of submodule names"):
        compile_modules(m, "decoder", "eager")


@needs_cpp
def test_compiled_render_matches_eager_forward_and_backward():
    torch.manual_seed(0)
    eager = _Renders()
    compiled = _Renders()
    compiled.load_state_dict(eager.state_dict())
    assert compile_modules(compiled, [""], "aot_eager") == [""]
    assert is_compiled(compiled)
    torch._dynamo.reset()
    outs = []
    for m in (eager, compiled):
        planes, *rest = _inputs()
        y = m(planes, *rest)
        g = torch.autograd.grad(y.square().mean(), [planes, *m.parameters()])
        outs.append((y, g))
    from torch._dynamo.utils import counters
    assert counters["stats"]["unique_graphs"] >= 1      # a graph was captured, not skipped
    assert_close(outs[1][0], outs[0][0])
    for a, b in zip(outs[1][1], outs[0][1]):
        assert_close(a, b)


def test_random_draws_trace_for_varying_shapes_without_a_generator():
    """Modules that draw random numbers with an optional generator (the VAE's reparameterisation,
    the density regularisers) trace under torch.compile at several batch sizes (an explicit
    generator=None fails once the shape is dynamic) and draw the numbers they drew before."""
    from pyface.nn import GaussianMLPVAE, OSGDecoder, density_l1_regularizer
    from pyface.nn.compiling import generator_kwargs

    assert generator_kwargs(None) == {}
    g = torch.Generator()
    assert generator_kwargs(g) == {"generator": g}

    class Regularised(nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = GaussianMLPVAE(in_dim=16, hidden=[8], latent=4)
            self.decoder = OSGDecoder(8, 16, 4)

        def forward(self, x, planes):
            return (self.vae(x, sample=True)["recon"].mean()
                    + density_l1_regularizer(planes, self.decoder, n_points=8,
                                             plane_axes="eg3d"))

    m = Regularised()
    eager = Regularised()
    eager.load_state_dict(m.state_dict())
    compile_modules(m, [""], "aot_eager")
    torch._dynamo.reset()
    for B in (2, 3, 5):
        x, planes = torch.randn(B, 16), torch.randn(B, 3, 8, 8, 8)
        torch.manual_seed(B)
        got = m(x, planes)
        torch.manual_seed(B)
        assert_close(got, eager(x, planes))
