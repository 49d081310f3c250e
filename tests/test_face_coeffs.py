"""Deep3DFaceRecon 257-dim layout and OTAvatar's 70 x 27 motion windows."""
import pytest
import torch

from pyface.face import coeffs as C


def test_layout_covers_257_contiguously():
    start = 0
    for name, sl in C.LAYOUT.items():
        assert sl.start == start, name
        start = sl.stop
    assert start == C.COEFF_DIM == 257
    sizes = {k: s.stop - s.start for k, s in C.LAYOUT.items()}
    assert sizes == {"id": 80, "exp": 64, "tex": 80, "angles": 3, "gamma": 27, "trans": 3}


def test_split_merge_roundtrip():
    x = torch.randn(5, 7, 257)
    parts = C.split_coeffs(x)
    assert torch.equal(parts["exp"], x[..., 80:144])
    assert torch.equal(parts["trans"], x[..., 254:])
    assert torch.equal(C.merge_coeffs(**parts), x)
    c = C.Coeffs.split(x)
    assert torch.equal(c.merge(), x)
    assert C.Coeffs.zeros(3).merge().shape == (3, 257)
    # broadcasting of a shared identity
    m = C.merge_coeffs(torch.ones(80), torch.zeros(4, 64), torch.zeros(80), torch.zeros(4, 3),
                       torch.zeros(4, 27), torch.zeros(4, 3))
    assert m.shape == (4, 257) and (m[:, :80] == 1).all()


def test_bad_shapes_name_the_argument():
    with pytest.raises(ValueError, match=r"coeffs: expected shape \(\.\.\., 257\), got \(2, 256\)"):
        C.split_coeffs(torch.zeros(2, 256))
    with pytest.raises(ValueError, match="exp: expected shape"):
        C.merge_coeffs(torch.zeros(80), torch.zeros(63), torch.zeros(80), torch.zeros(3),
                       torch.zeros(27), torch.zeros(3))


def test_motion_70():
    x = torch.randn(3, 257)
    m = C.motion_from_coeffs(x)
    assert m.shape == (3, 70)
    assert torch.equal(m, torch.cat([x[:, 80:144], x[:, 224:227], x[:, 254:257]], 1))


def test_window_clamps_at_video_ends():
    idx = C.window_indices(0, 40)
    assert idx.shape == (27,)
    assert idx[:14].tolist() == [0] * 14 and idx[14:].tolist() == list(range(1, 14))
    idx = C.window_indices(39, 40)
    assert idx[13:].tolist() == [39] * 14
    assert C.window_indices(20, 40).tolist() == list(range(7, 34))
    # a video shorter than the window
    assert C.window_indices(2, 3).tolist() == [0] * 12 + [1] + [2] * 14
    with pytest.raises(IndexError, match="index"):
        C.window_indices(40, 40)


def test_motion_window_values_and_batch():
    T = 30
    x = torch.randn(T, 257)
    w = C.motion_window(x, 5)
    assert w.shape == (70, 27)
    motion = C.motion_from_coeffs(x)
    for k, src in enumerate(C.window_indices(5, T).tolist()):
        assert torch.equal(w[:, k], motion[src])
    wb = C.motion_window(x, torch.tensor([0, 5, 29]))
    assert wb.shape == (3, 70, 27)
    assert torch.equal(wb[1], w)
    with pytest.raises(ValueError, match="coeffs"):
        C.motion_window(torch.randn(2, 5, 257), 0)


def test_bad_coefficient_input_names_the_argument():
    with pytest.raises(ValueError, match=r"id, exp, tex, angles, gamma, trans: leading \(batch\) "
                                         r"dims do not broadcast: id \(2, 80\), exp \(3, 64\)"):
        C.merge_coeffs(torch.zeros(2, 80), torch.zeros(3, 64), torch.zeros(2, 80),
                       torch.zeros(2, 3), torch.zeros(2, 27), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"coeffs: expected shape \(T, 257\) with T >= 1 frames, "
                                         r"got \(0, 257\)"):
        C.motion_window(torch.zeros(0, 257), 0)
    with pytest.raises(TypeError, match="index: expected an int or an integer tensor, got 1.5"):
        C.motion_window(torch.zeros(5, 257), 1.5)
    with pytest.raises(ValueError, match="radius: expected an integer >= 0, got -1"):
        C.window_indices(0, 5, -1)
    with pytest.raises(ValueError, match="length: expected an integer > 0, got 0"):
        C.window_indices(0, 0)
    # an empty batch of indices is an empty batch of windows
    assert C.motion_window(torch.zeros(5, 257), torch.zeros(0, dtype=torch.int64)).shape == (0, 70, 27)
