"""Camera conventions: EG3D labels, look-at, FOV, orbits, mirroring, Deep3DFaceRecon -> EG3D."""
import math

import pytest
import torch

from pyface.face import cameras as cam
from pyface.testing import assert_close

D = torch.float64


def _rand_pose(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    angles = (torch.rand(n, 3, generator=g, dtype=D) - 0.5) * torch.tensor([0.7, 1.2, 0.5], dtype=D)
    trans = (torch.rand(n, 3, generator=g, dtype=D) - 0.5) * torch.tensor([0.2, 0.2, 1.0], dtype=D)
    return angles, trans


def test_label_pack_roundtrip():
    c2w = cam.orbit_camera(torch.tensor([0.1, -0.3], dtype=D), torch.tensor([0.2, 0.0], dtype=D))
    k = cam.intrinsics_from_focal(dtype=D)
    label = cam.make_label(c2w, k)
    assert label.shape == (2, 25)
    c2, k2 = cam.split_label(label)
    assert torch.equal(c2, c2w) and torch.equal(k2, k.expand(2, 3, 3))
    with pytest.raises(ValueError, match=r"label: expected shape \(\.\.\., 25\), got \(2, 24\)"):
        cam.split_label(label[:, :24])


def test_eg3d_ffhq_default_label():
    # EG3D's FFHQ frontal camera: radius 2.7 around the origin, looking at (0, 0, 0.2), focal 4.2647
    label = cam.default_label()
    assert label.dtype == torch.float32
    c2w, k = cam.split_label(label)
    assert_close(c2w[:3, 3], torch.tensor([0.0, 0.0, 2.7]))
    assert_close(c2w[:3, :3], torch.diag(torch.tensor([1.0, -1.0, -1.0])))
    assert_close(k, torch.tensor([[4.2647, 0, 0.5], [0, 4.2647, 0.5], [0, 0, 1]]))
    # EG3D FOV_to_intrinsics(18.837) gives the FFHQ focal to 4 digits
    assert abs(cam.fov_to_focal(cam.FFHQ_FOV_DEG) - cam.FFHQ_FOCAL) < 2e-3
    # the pivot projects to the image centre
    uv, z = cam.project_label(torch.tensor([[[0.0, 0.0, 0.2]]]), label[None])
    assert_close(uv, torch.full((1, 1, 2), 0.5))
    assert_close(z, torch.full((1, 1, 1), 2.5))


@pytest.mark.parametrize("convention", ["eg3d", "pinhole"])
def test_fov_focal_roundtrip(convention):
    for fov in (5.0, 12.0, 18.837, 45.0, 90.0):
        f = cam.fov_to_focal(fov, convention)
        assert abs(cam.focal_to_fov(f, convention) - fov) < 1e-9
    # pinhole: the image spans exactly the FOV
    f = cam.fov_to_focal(30.0, "pinhole")
    assert abs(2 * math.degrees(math.atan(0.5 / f)) - 30.0) < 1e-9
    with pytest.raises(ValueError, match="convention"):
        cam.fov_to_focal(10.0, "opengl")


def test_look_at_properties():
    origin = torch.tensor([[1.0, 0.5, 2.0], [-2.0, -0.3, 1.0]], dtype=D)
    target = torch.tensor([0.1, 0.2, -0.1], dtype=D)
    c2w = cam.look_at(origin, target)
    r = c2w[:, :3, :3]
    assert_close(r.transpose(1, 2) @ r, torch.eye(3, dtype=D).expand(2, 3, 3), scale=1e3)
    assert_close(torch.linalg.det(r), torch.ones(2, dtype=D), scale=1e3)
    fwd = (target - origin) / (target - origin).norm(dim=-1, keepdim=True)
    assert_close(r[:, :, 2], fwd, scale=1e3)
    # image "down" (camera +y) points to world -y: the world up axis is up in the image
    assert (r[:, 1, 1] < 0).all()
    uv, _ = cam.project_label(target.expand(2, 1, 3),
                              cam.make_label(c2w, cam.intrinsics_from_focal(dtype=D)))
    assert_close(uv, torch.full((2, 1, 2), 0.5, dtype=D), scale=1e4)


def test_look_at_refuses_a_camera_without_a_view_direction():
    """origin == target, a zero up, or a view direction along up has no rotation: an error
    naming the arguments, their values and the batch index, not a zero or NaN matrix."""
    with pytest.raises(ValueError, match=r"^origin, target: expected target != origin \(a view "
                                         r"direction\), got origin \(0, 0, 0\.2\) and target "
                                         r"\(0, 0, 0\.2\)$"):
        cam.look_at((0.0, 0.0, 0.2))                    # at the default target
    origin = torch.tensor([[0.0, 0.0, 2.7], [1.0, 2.0, 3.0], [0.0, 0.0, 1.0]], dtype=D)
    target = torch.tensor([[0.0, 0.0, 0.2], [1.0, 2.0, 3.0], [0.0, 0.0, 1.0]], dtype=D)
    with pytest.raises(ValueError, match=r"^origin, target: .* got origin \(1, 2, 3\) and "
                                         r"target \(1, 2, 3\) \(batch index 1\)$"):
        cam.look_at(origin, target)
    with pytest.raises(ValueError, match=r"\(batch index \(1, 0\)\)$"):
        cam.look_at(origin[:2].reshape(2, 1, 3), target[1])
    with pytest.raises(ValueError, match=r"^up: expected a non-zero vector, got \(0, 0, 0\)$"):
        cam.look_at((0.0, 0.0, 2.7), up=(0.0, 0.0, 0.0))
    above = torch.tensor([[0.0, 0.0, 2.7], [0.0, 3.0, 0.2]])      # float32: rounding included
    with pytest.raises(ValueError, match=r"^origin, target, up: expected a view direction "
                                         r"target - origin not parallel to up, got target - "
                                         r"origin = \(0, -3, 0\) \(origin \(0, 3, 0\.2\), "
                                         r"target \(0, 0, 0\.2\)\) along up \(0, 1, 0\) "
                                         r"\(batch index 1\): the image's up is undefined"):
        cam.look_at(above)
    with pytest.raises(ValueError, match=r"parallel to up, .* along up \(0, 0, -2\)"):
        cam.look_at((0.0, 0.0, 2.7), (0.0, 0.0, 0.0), up=(0.0, 0.0, -2.0))
    # a camera close to these, but not on them, still gets its rotation
    for o, t, u in (((0.0, 0.0, 0.2 + 1e-6), (0.0, 0.0, 0.2), (0.0, 1.0, 0.0)),
                    ((1e-4, 3.0, 0.0), (0.0, 0.0, 0.0), (0.0, 1.0, 0.0))):
        r = cam.look_at(torch.tensor(o, dtype=D), torch.tensor(t, dtype=D),
                        torch.tensor(u, dtype=D))[:3, :3]
        assert_close(r.T @ r, torch.eye(3, dtype=D), scale=1e3)


def test_orbit_camera_refuses_a_camera_at_or_above_the_pivot():
    """The orbit helpers name their own arguments: a camera at the pivot (radius 0 around a pivot
    at the origin), or straight above it (pitch 90 degrees, or the pitch that puts an FFHQ
    camera right above FFHQ's pivot)."""
    with pytest.raises(ValueError, match=r"^radius, pivot: expected a camera away from the "
                                         r"pivot, got yaw 0, pitch 0 and radius 0, which put "
                                         r"the camera at \(0, 0, 0\), the pivot \(0, 0, 0\): "
                                         "it has no view direction$"):
        cam.orbit_camera(0.0, 0.0, radius=0.0, pivot=(0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match=r"^yaw, pitch: expected a camera not straight above or "
                                         r"below the pivot, got yaw 0, pitch 1\.5708 and radius "
                                         r"2\.7, .* the pivot \(0, 0, 0\): it looks along the "
                                         r"world up"):
        cam.orbit_camera(0.0, math.pi / 2, pivot=(0.0, 0.0, 0.0))
    pitch = torch.tensor([0.0, 0.1, math.acos(cam.FFHQ_PIVOT[2] / cam.FFHQ_RADIUS)], dtype=D)
    with pytest.raises(ValueError, match=r"^yaw, pitch: .* pitch 1\.49665 and radius 2\.7, "
                                         r"which put the camera at \(0, 2\.69258, 0\.2\), the "
                                         r"pivot \(0, 0, 0\.2\) \(batch index 2\)"):
        cam.orbit_camera(torch.zeros(3, dtype=D), pitch)
    # radius 0 around FFHQ's pivot is a camera at the origin looking along +z: valid
    c2w = cam.orbit_camera(0.0, 0.0, radius=0.0)
    assert torch.equal(c2w[:3, 3], torch.zeros(3)) and torch.isfinite(c2w).all()
    assert_close(c2w[:3, 2], torch.tensor([0.0, 0.0, 1.0]), scale=1e3)


def test_look_at_and_orbit_camera_refuse_non_finite_inputs():
    """NaN / inf would give a NaN camera (the view-direction checks let it through): an error
    naming the argument, its value or the batch indices of the rows with NaN or inf."""
    nan, inf = math.nan, math.inf
    with pytest.raises(ValueError, match=r"^origin: expected finite values, got \(0, 0, nan\)$"):
        cam.look_at((0.0, 0.0, nan))
    origin = torch.tensor([[0.0, 0.0, 2.7], [0.0, 0.0, 2.7], [inf, 0.0, 1.0]], dtype=D)
    with pytest.raises(ValueError, match=r"^origin: expected finite values, got NaN or inf at "
                                         r"batch indices \[2\] \(the first: \(inf, 0, 1\)\)$"):
        cam.look_at(origin)
    target = torch.tensor([[[0.0, 0.0, 0.2], [0.0, -inf, nan]]], dtype=D)
    with pytest.raises(ValueError, match=r"^target: .* at batch indices \[\(0, 1\)\] "
                                         r"\(the first: \(0, -inf, nan\)\)$"):
        cam.look_at(origin[:2], target)
    with pytest.raises(ValueError, match=r"^up: expected finite values, got \(0, nan, 0\)$"):
        cam.look_at((0.0, 0.0, 2.7), up=(0.0, nan, 0.0))
    with pytest.raises(ValueError, match=r"^yaw: expected finite values, got nan$"):
        cam.orbit_camera(nan, 0.0)
    with pytest.raises(ValueError, match=r"^pitch: .* at batch indices \[1, 2\] \(the first: "
                                         r"inf\)$"):
        cam.orbit_camera(0.0, torch.tensor([0.1, inf, nan], dtype=D))
    rows = ", ".join(str(i) for i in range(8))
    with pytest.raises(ValueError, match=rf"^yaw: .* indices \[{rows}, \.\.\.\]"):
        cam.orbit_camera(torch.full((9,), nan), 0.0)
    for radius, got in ((inf, "a finite number, got inf"), (nan, "a finite number, got nan"),
                        (torch.tensor(nan), "finite values, got nan")):
        with pytest.raises(ValueError, match=rf"^radius: expected {got}$"):
            cam.orbit_camera(0.0, 0.0, radius=radius)
    with pytest.raises(ValueError, match=r"^pivot: expected finite values, got \(0, 0, inf\)$"):
        cam.orbit_camera(0.0, 0.0, pivot=(0.0, 0.0, inf))
    # finite values, large or tiny, still give a camera
    c2w = cam.orbit_camera(torch.tensor([1e-30, 3.0], dtype=D), 0.0, radius=1e30)
    assert torch.isfinite(c2w).all()


def test_orbit_yaw_pitch_roundtrip_and_direction():
    yaw = torch.tensor([-0.6, -0.1, 0.0, 0.3, 0.6], dtype=D)
    pitch = torch.tensor([0.3, -0.2, 0.0, 0.1, -0.35], dtype=D)
    c2w = cam.orbit_camera(yaw, pitch)
    y2, p2 = cam.camera_yaw_pitch(c2w)
    assert_close(y2, yaw, scale=1e3)
    assert_close(p2, pitch, scale=1e3)
    assert_close(c2w[:, :3, 3].norm(dim=-1), torch.full((5,), 2.7, dtype=D), scale=1e3)
    # yaw > 0 puts the camera on the subject's left (+x), pitch > 0 above
    assert c2w[4, 0, 3] > 0 and c2w[0, 0, 3] < 0 and c2w[0, 1, 3] > 0
    labels = cam.orbit_labels(8)
    assert labels.shape == (8, 25)
    cam.check_label(labels)


def test_mirror_label():
    yaw = torch.tensor([0.4, -0.2], dtype=D)
    pitch = torch.tensor([0.1, -0.15], dtype=D)
    k = cam.intrinsics_from_focal(dtype=D)
    label = cam.make_label(cam.orbit_camera(yaw, pitch), k)
    m = cam.mirror_label(label)
    assert torch.equal(cam.mirror_label(m), label)
    # the mirror of a yaw orbit is the opposite yaw
    assert_close(m, cam.make_label(cam.orbit_camera(-yaw, pitch), k), scale=1e4)
    # a mirrored point seen by the mirrored camera lands at the mirrored image position
    g = torch.Generator().manual_seed(1)
    p = torch.rand(2, 10, 3, generator=g, dtype=D) * 0.4 - 0.2
    uv, z = cam.project_label(p, label)
    uvm, zm = cam.project_label(p * torch.tensor([-1.0, 1, 1], dtype=D), m)
    assert_close(uvm[..., 0], 1 - uv[..., 0], scale=1e4)
    assert_close(uvm[..., 1], uv[..., 1], scale=1e4)
    assert_close(zm, z, scale=1e4)
    # EG3D flips exactly the entries (0,1), (0,2), (1,0), (2,0), (0,3)
    diff = (m[0, :16] != label[0, :16]).nonzero().flatten().tolist()
    assert set(diff) <= {1, 2, 4, 8, 3}


def test_euler_rotation_roundtrip():
    angles, _ = _rand_pose(16)
    r = cam.euler_to_rotation(angles)
    assert_close(r @ r.transpose(1, 2), torch.eye(3, dtype=D).expand(16, 3, 3), scale=1e3)
    assert_close(cam.rotation_to_euler(r), angles, scale=1e3)
    # pitch about x, yaw about y, roll about z, composed Rz Ry Rx
    a = torch.tensor([[0.0, 0.5, 0.0]], dtype=D)
    assert_close(cam.euler_to_rotation(a)[0] @ torch.tensor([0, 0, 1.0], dtype=D),
                 torch.tensor([math.sin(0.5), 0, math.cos(0.5)], dtype=D), scale=1e3)
    with pytest.raises(ValueError, match="angles"):
        cam.euler_to_rotation(torch.zeros(2, 4))


@pytest.mark.parametrize("offsets", [False, True])
def test_deep3d_to_eg3d_roundtrip(offsets):
    angles, trans = _rand_pose(12, seed=3)
    c2w = cam.deep3d_to_cam2world(angles, trans, submission_offsets=offsets)
    a2, t2 = cam.cam2world_to_deep3d(c2w, submission_offsets=offsets)
    assert_close(a2, angles, scale=1e3)
    assert_close(t2, trans, scale=1e3)
    label = cam.deep3d_to_label(angles, trans, submission_offsets=offsets)
    cam.check_label(label)


def test_deep3d_zero_pose_and_offsets():
    z = torch.zeros(1, 3, dtype=D)
    c2w = cam.deep3d_to_cam2world(z, z)
    assert_close(c2w[0, :3, 3], torch.tensor([0, 0, 2.7], dtype=D), scale=1e3)
    assert_close(c2w[0, :3, :3], torch.diag(torch.tensor([1.0, -1, -1], dtype=D)))
    c2w_o = cam.deep3d_to_cam2world(z, z, submission_offsets=True)
    assert_close(c2w_o[0, :3, 3] - c2w[0, :3, 3], torch.tensor([0, 0.006, 0.161], dtype=D), scale=1e3)
    assert torch.equal(c2w_o[:, :3, :3], c2w[:, :3, :3])


def test_deep3d_projection_matches_eg3d_camera():
    """The posed head seen by Deep3DFaceRecon's camera and the unposed head (x 0.27) seen by the
    converted EG3D camera give the same image up to the focal ratio and the y-axis flip."""
    angles, trans = _rand_pose(4, seed=5)
    g = torch.Generator().manual_seed(2)
    v = (torch.rand(4, 50, 3, generator=g, dtype=D) - 0.5) * 1.6
    posed = v @ cam.euler_to_rotation(angles).transpose(1, 2) + trans[:, None]
    xy, depth = cam.project_bfm(posed)
    uv, z = cam.project_label(v * cam.BFM_TO_EG3D_SCALE, cam.deep3d_to_label(angles, trans))
    ratio = cam.FFHQ_FOCAL / (cam.BFM_FOCAL / cam.BFM_IMAGE_SIZE)
    assert_close(uv[..., 0] - 0.5, ratio * (xy[..., 0] / 224 - 0.5), scale=1e4)
    assert_close(uv[..., 1] - 0.5, -ratio * (xy[..., 1] / 224 - 0.5), scale=1e4)
    assert_close(z, depth * cam.BFM_TO_EG3D_SCALE, scale=1e4)


def test_check_label_errors():
    label = cam.default_label()
    bad = label.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="cam: contains NaN"):
        cam.check_label(bad, "cam")
    bad = label.clone()
    bad[0] = 2.0
    with pytest.raises(ValueError, match="not orthonormal"):
        cam.check_label(bad)


def test_intrinsics_to_pixels():
    k = cam.intrinsics_from_focal(4.2647)
    kp = cam.intrinsics_to_pixels(k, 512)
    assert_close(kp, torch.tensor([[4.2647 * 512, 0, 256], [0, 4.2647 * 512, 256], [0, 0, 1.0]]))


@pytest.mark.parametrize("offsets", [False, True])
def test_mirrored_pose_gives_mirrored_label(offsets):
    """Negating yaw, roll and x translation (how the loaders mirror coefficients) mirrors the
    converted EG3D camera."""
    angles, trans = _rand_pose(6, seed=7)
    flip_a = torch.tensor([1.0, -1.0, -1.0], dtype=D)
    flip_t = torch.tensor([-1.0, 1.0, 1.0], dtype=D)
    label = cam.deep3d_to_label(angles, trans, submission_offsets=offsets)
    mirrored = cam.deep3d_to_label(angles * flip_a, trans * flip_t, submission_offsets=offsets)
    assert_close(mirrored, cam.mirror_label(label), scale=1e4)


def test_bad_camera_input_names_the_argument():
    label = cam.default_label()[None]
    with pytest.raises(TypeError, match=r"cam2world: expected a torch.Tensor of shape \(\.\.\., 4, 4\), got list"):
        cam.make_label([[1.0]], torch.eye(3))
    with pytest.raises(TypeError, match="cam2world: expected a floating-point tensor, got dtype int64"):
        cam.make_label(torch.eye(4, dtype=torch.int64), torch.eye(3))
    with pytest.raises(ValueError, match=r"cam2world, intrinsics: leading \(batch\) dims do not "
                                         r"broadcast: \(2,\), \(3,\)"):
        cam.make_label(torch.eye(4).expand(2, 4, 4), torch.eye(3).expand(3, 3, 3))
    with pytest.raises(ValueError, match=r"fov_deg: expected a finite number in \(0, 180\), got 0"):
        cam.fov_to_focal(0)
    with pytest.raises(ValueError, match="fov_deg: .* got nan"):
        cam.fov_to_focal(float("nan"), "pinhole")
    with pytest.raises(TypeError, match="fov_deg: expected a number"):
        cam.fov_to_focal(torch.tensor([18.0, 20.0]))
    with pytest.raises(ValueError, match="focal: expected a finite number > 0, got nan"):
        cam.focal_to_fov(float("nan"))
    with pytest.raises(ValueError, match=r"intrinsics: expected shape \(\.\.\., 3, 3\), got \(3,\)"):
        cam.intrinsics_to_pixels(torch.ones(3), 64)
    with pytest.raises(ValueError, match="width: expected a finite number > 0, got 0"):
        cam.intrinsics_to_pixels(torch.eye(3), 0)
    with pytest.raises(ValueError, match=r"origin: expected shape \(\.\.\., 3\), got \(2,\)"):
        cam.look_at(torch.zeros(2))
    with pytest.raises(TypeError, match="origin: expected a floating-point tensor"):
        cam.look_at(torch.tensor([0, 0, 3]))
    with pytest.raises(ValueError, match=r"yaw, pitch: leading \(batch\) dims do not broadcast"):
        cam.orbit_camera(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="n: expected an integer >= 0, got -1"):
        cam.orbit_labels(-1)
    with pytest.raises(ValueError, match=r"cam2world: expected shape \(\.\.\., 4, 4\), got \(3, 3\)"):
        cam.camera_yaw_pitch(torch.eye(3))
    with pytest.raises(ValueError, match=r"cam2world: expected shape \(\.\.\., 4, 4\), got \(3, 3\)"):
        cam.cam2world_to_deep3d(torch.eye(3))
    with pytest.raises(ValueError, match=r"rot: expected shape \(\.\.\., 3, 3\), got \(2, 2\)"):
        cam.rotation_to_euler(torch.eye(2))
    with pytest.raises(TypeError, match="angles: expected a floating-point tensor"):
        cam.euler_to_rotation(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"trans: expected shape \(\.\.\., 3\), got \(2,\)"):
        cam.deep3d_to_cam2world(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"angles, trans: leading \(batch\) dims do not broadcast"):
        cam.deep3d_to_label(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"label: expected shape \(\.\.\., 25\), got \(24,\)"):
        cam.mirror_label(torch.zeros(24))
    with pytest.raises(TypeError, match="label: expected a floating-point tensor"):
        cam.check_label(torch.zeros(1, 25, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"points: expected shape \(B, N, 3\), got \(1, 5, 2\)"):
        cam.project_label(torch.zeros(1, 5, 2), label)
    with pytest.raises(ValueError, match=r"points: expected shape \(B, N, 3\), got \(5, 3\)"):
        cam.project_label(torch.zeros(5, 3), label)
    with pytest.raises(ValueError, match=r"label: expected shape \(2, 25\) \(B of points\), got \(3, 25\)"):
        cam.project_label(torch.zeros(2, 5, 3), label.expand(3, 25))
    with pytest.raises(TypeError, match="label: expected the dtype of points"):
        cam.project_label(torch.zeros(1, 5, 3, dtype=D), label)
    with pytest.raises(ValueError, match="label: cam2world is not invertible"):
        cam.project_label(torch.zeros(1, 5, 3), torch.zeros(1, 25))
    with pytest.raises(ValueError, match=r"points: expected shape \(B, N, 3\), got \(1, 5, 2\)"):
        cam.project_bfm(torch.zeros(1, 5, 2))


def test_empty_camera_batches():
    assert cam.make_label(torch.zeros(0, 4, 4), torch.eye(3)).shape == (0, 25)
    cam.check_label(torch.zeros(0, 25))
    assert cam.mirror_label(torch.zeros(0, 25)).shape == (0, 25)
    assert cam.look_at(torch.zeros(0, 3)).shape == (0, 4, 4)
    assert cam.orbit_camera(torch.zeros(0), torch.zeros(0)).shape == (0, 4, 4)
    assert cam.orbit_labels(0).shape == (0, 25)
    assert cam.deep3d_to_label(torch.zeros(0, 3), torch.zeros(0, 3)).shape == (0, 25)
    angles, trans = cam.cam2world_to_deep3d(torch.zeros(0, 4, 4))
    assert angles.shape == trans.shape == (0, 3)
    uv, z = cam.project_label(torch.zeros(0, 5, 3), torch.zeros(0, 25))
    assert uv.shape == (0, 5, 2) and z.shape == (0, 5, 1)
