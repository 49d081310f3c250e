# Provenance: reproduces the ParametricFaceModel semantics (bases, SH lighting, pose) of
# Deep3DFaceRecon (sicxu/Deep3DFaceRecon_pytorch, MIT); BFM data are read from a user path and
# carry the Basel Face Model's own terms. Our own implementation, written from the papers and the
# upstream's documented behaviour; no upstream code is copied. pyface's code is licensed under
# Apache-2.0 (LICENSE).
"""3D morphable face model: linear id/exp/tex bases, SH lighting, rigid pose, rendering.

A :class:`MorphableModel` follows Deep3DFaceRecon's ``ParametricFaceModel`` (the model every
pipeline here uses to produce 257-dim coefficients, see :mod:`pyface.face.coeffs`):

* shape ``S = mean_shape + id_basis @ id + exp_basis @ exp`` in BFM units (head frame: y up,
  face towards +z);
* albedo ``A = mean_tex + tex_basis @ tex`` in [0, 1] (Deep3DFaceRecon's 0..255 / 255);
* pose ``R(angles) S + trans`` (:func:`pyface.face.cameras.euler_to_rotation`);
* colour ``A * SH(R n, gamma)``: 9-band spherical-harmonics irradiance per colour, ``gamma``
  colour-major (R bands 0..8, G 9..17, B 18..26) plus Deep3DFaceRecon's ambient offset 0.8 on
  band 0, evaluated per vertex on the posed (camera-frame) normals.

Rendering uses EG3D cameras: the unposed head is placed in the EG3D world frame scaled by 0.27
(:data:`pyface.face.cameras.BFM_TO_EG3D_SCALE`) and the pose becomes the camera
(:func:`pyface.face.cameras.deep3d_to_label`), so the rendered image of coefficients ``c`` is
exactly what the stored EG3D label of ``c`` sees. All rendering goes through
:func:`pyface.face.render.render_mesh`.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

from pyface.face import cameras as cam
from pyface.face.coeffs import COEFF_DIM, EXP_DIM, ID_DIM, TEX_DIM, split_coeffs
from pyface.face.render import _size, render_mesh

# Deep3DFaceRecon's SH constants and ambient initialisation.
_SH_A = (math.pi, 2 * math.pi / math.sqrt(3.0), 2 * math.pi / math.sqrt(8.0))
_SH_C = (1 / math.sqrt(4 * math.pi), math.sqrt(3.0) / math.sqrt(4 * math.pi),
         3 * math.sqrt(5.0) / math.sqrt(12 * math.pi))
INIT_LIGHT = 0.8


def sh_basis(normals: torch.Tensor) -> torch.Tensor:
    """Deep3DFaceRecon's 9 SH basis values ``(..., 9)`` of unit ``normals: (..., 3)``."""
    a, c = _SH_A, _SH_C
    x, y, z = normals.unbind(-1)
    return torch.stack([
        torch.full_like(x, a[0] * c[0]),
        -a[1] * c[1] * y, a[1] * c[1] * z, -a[1] * c[1] * x,
        a[2] * c[2] * x * y, -a[2] * c[2] * y * z,
        0.5 * a[2] * c[2] / math.sqrt(3.0) * (3 * z * z - 1),
        -a[2] * c[2] * x * z, 0.5 * a[2] * c[2] * (x * x - y * y)], dim=-1)


def sh_shading(normals: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Irradiance ``(B, V, 3)`` of ``normals: (B, V, 3)`` under ``gamma: (B, 27)``."""
    g = gamma.reshape(gamma.shape[0], 3, 9).clone()
    g[:, :, 0] = g[:, :, 0] + INIT_LIGHT
    return sh_basis(normals) @ g.transpose(1, 2)


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals ``(B, V, 3)`` of ``verts: (B, V, 3)`` and the
    triangles ``faces: (F, 3)`` (int64 vertex indices)."""
    p = verts[:, faces]                                           # (B, F, 3, 3)
    fn = torch.linalg.cross(p[:, :, 1] - p[:, :, 0], p[:, :, 2] - p[:, :, 0], dim=-1)
    n = torch.zeros_like(verts)
    for k in range(3):
        n = n.index_add(1, faces[:, k], fn)
    return n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _inside_polygon(pts, poly):
    """Even-odd test of ``pts (N, 2)`` against the closed polygon ``poly (K, 2)``; (N,) bool."""
    x, y = pts[:, 0:1], pts[:, 1:2]
    x0, y0 = poly[:, 0][None], poly[:, 1][None]
    x1, y1 = poly.roll(-1, 0)[:, 0][None], poly.roll(-1, 0)[:, 1][None]
    crosses = ((y0 > y) != (y1 > y)) & (x < (x1 - x0) * (y - y0) / (y1 - y0 + 1e-30) + x0)
    return crosses.sum(1) % 2 == 1


def regions_from_landmarks(verts: torch.Tensor, faces: torch.Tensor, landmarks: torch.Tensor,
                           brow_width: float = 0.35) -> dict[str, torch.Tensor]:
    """Eye, mouth and brow regions ``(V,)`` of any head mesh with iBUG-68 landmarks:
    ``verts: (V, 3)`` (unposed, facing +z), ``faces: (F, 3)`` and ``landmarks: (68,)`` vertex
    indices.

    A vertex belongs to a region when it faces the camera (+z normal) and its frontal (x, y)
    projection lies inside the landmark polygon: eyes 36-41 / 42-47, mouth 48-59; brows are the
    band of half-height ``brow_width`` x (brow length / 5) around 17-21 / 22-26. Used for models
    that ship no region masks (``from_bfm``).
    """
    v = verts.double()
    n = vertex_normals(v[None], faces)[0]
    front = n[:, 2] > 0.2
    xy = v[:, :2]
    lm = xy[landmarks]
    out = {}
    for name, idx in (("right_eye", range(36, 42)), ("left_eye", range(42, 48)),
                      ("mouth", range(48, 60))):
        out[name] = front & _inside_polygon(xy, lm[list(idx)])
    for name, idx in (("right_brow", range(17, 22)), ("left_brow", range(22, 27))):
        line = lm[list(idx)]
        half = brow_width * (line[-1] - line[0]).norm() / 5
        up = line + torch.tensor([0.0, 1.0], dtype=v.dtype) * half
        down = line - torch.tensor([0.0, 1.0], dtype=v.dtype) * half
        out[name] = front & _inside_polygon(xy, torch.cat([up, down.flip(0)]))
    out["eyes"] = out["left_eye"] | out["right_eye"]
    out["brows"] = out["left_brow"] | out["right_brow"]
    return out


@dataclass
class Render:
    """Output of :meth:`MorphableModel.render` (B images of size H x W).

    ``image (B, 3, H, W)`` in [0, 1] composited over the background, ``mask (B, 1, H, W)``,
    ``depth (B, 1, H, W)`` camera depth in EG3D units (inf outside), ``landmarks (B, 68, 2)`` in
    pixels (x right, y down, pixel centres at +0.5), ``face_index (B, H, W)``,
    ``regions``: name -> ``(B, 1, H, W)`` float masks (only when requested).
    """

    image: torch.Tensor
    mask: torch.Tensor
    depth: torch.Tensor
    landmarks: torch.Tensor
    face_index: torch.Tensor
    label: torch.Tensor
    regions: dict | None = None


class MorphableModel(torch.nn.Module):
    """A linear 3D morphable face model in the Deep3DFaceRecon layout (80 id, 64 exp, 80 tex).

    Buffers: ``mean_shape (V, 3)``, ``id_basis (V*3, 80)``, ``exp_basis (V*3, 64)``,
    ``mean_tex (V, 3)``, ``tex_basis (V*3, 80)``, ``faces (F, 3)``, ``landmarks (68,)``, and one
    ``(V,)`` bool mask per region (``region_names``). Build with :meth:`builtin` or
    :meth:`from_bfm`. ``cull`` is the :func:`~pyface.face.render.render_mesh` culling mode of
    its renders: ``"cw"`` (back faces) for the closed, outward-oriented built-in head, ``"none"``
    otherwise.
    """

    cull = "none"

    def __init__(self, mean_shape, id_basis, exp_basis, mean_tex, tex_basis, faces, landmarks,
                 regions: dict | None = None, name: str = "custom", id_names=None, exp_names=None,
                 tex_names=None):
        super().__init__()
        v = mean_shape.shape[0]
        for arg, t, shape in (("mean_shape", mean_shape, (v, 3)), ("id_basis", id_basis, (v * 3, ID_DIM)),
                              ("exp_basis", exp_basis, (v * 3, EXP_DIM)), ("mean_tex", mean_tex, (v, 3)),
                              ("tex_basis", tex_basis, (v * 3, TEX_DIM))):
            if tuple(t.shape) != shape:
                raise ValueError(f"{arg}: expected shape {shape}, got {tuple(t.shape)}")
        if faces.dim() != 2 or faces.shape[1] != 3:
            raise ValueError(f"faces: expected shape (F, 3), got {tuple(faces.shape)}")
        if faces.numel() and (int(faces.min()) < 0 or int(faces.max()) >= v):
            raise ValueError(f"faces: indices must be in [0, {v - 1}]")
        if landmarks.shape != (68,) or int(landmarks.min()) < 0 or int(landmarks.max()) >= v:
            raise ValueError(f"landmarks: expected 68 vertex indices in [0, {v - 1}], got "
                             f"shape {tuple(landmarks.shape)}")
        self.name = name
        self.register_buffer("mean_shape", mean_shape.float())
        self.register_buffer("id_basis", id_basis.float())
        self.register_buffer("exp_basis", exp_basis.float())
        self.register_buffer("mean_tex", mean_tex.float())
        self.register_buffer("tex_basis", tex_basis.float())
        self.register_buffer("faces", faces.long())
        self.register_buffer("landmarks", landmarks.long())
        self.region_names = []
        for k, m in (regions or {}).items():
            if m.shape != (v,):
                raise ValueError(f"regions[{k!r}]: expected shape ({v},), got {tuple(m.shape)}")
            self.register_buffer(f"region_{k}", m.bool())
            self.region_names.append(k)
        self.id_names = list(id_names or [])
        self.exp_names = list(exp_names or [])
        self.tex_names = list(tex_names or [])

    # ------------------------------------------------------------------ construction
    @classmethod
    def builtin(cls) -> "MorphableModel":
        """The procedural head model shipped with pyface (see :mod:`pyface.face.procedural`).

        Built once per process and cached; each call returns a new module whose buffers are
        shared with the cache (``.to(device)`` makes copies; do not modify them in place)."""
        return _builtin_cached()._clone()

    def _clone(self) -> "MorphableModel":
        m = MorphableModel.__new__(MorphableModel)
        torch.nn.Module.__init__(m)
        m.name, m.region_names, m.cull = self.name, list(self.region_names), self.cull
        if hasattr(self, "id_std"):
            m.id_std = self.id_std
        m.id_names, m.exp_names, m.tex_names = self.id_names, self.exp_names, self.tex_names
        for k, b in self.named_buffers():
            m.register_buffer(k, b)
        return m

    @classmethod
    def from_bfm(cls, path: str | os.PathLike, recenter: bool = True) -> "MorphableModel":
        """Loads Deep3DFaceRecon's ``BFM_model_front.mat`` (user-provided; not shipped).

        Reads ``meanshape (1, 3V)``, ``idBase (3V, 80)``, ``exBase (3V, 64)``, ``meantex (1, 3V)``
        (0..255), ``texBase (3V, 80)``, ``tri (F, 3)`` and ``keypoints (1, 68)`` (both 1-based),
        and the optional ``skinmask``; eye, mouth and brow regions come from the landmarks
        (:func:`regions_from_landmarks`), ``face`` is the whole (front-face) mesh. With ``recenter`` (Deep3DFaceRecon's default)
        the mean shape is centred on its centroid. Loading executes no code (``scipy.io.loadmat``).
        """
        import numpy as np
        from scipy.io import loadmat

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"BFM model file not found: {path} (Deep3DFaceRecon's "
                                    "BFM_model_front.mat is user-provided; see docs/face.md)")
        try:
            m = loadmat(path)
        except Exception as e:  # scipy raises several types for corrupt files
            raise ValueError(f"{path}: not a readable .mat file ({e})") from e
        need = ("meanshape", "idBase", "exBase", "meantex", "texBase", "tri", "keypoints")
        missing = [k for k in need if k not in m]
        if missing:
            raise ValueError(f"{path}: missing BFM fields {missing} (expected Deep3DFaceRecon's "
                             "BFM_model_front.mat layout)")
        mean = np.asarray(m["meanshape"], np.float64).reshape(-1, 3)
        v = mean.shape[0]
        if recenter:
            mean = mean - mean.mean(0, keepdims=True)

        def base(key, k):
            b = np.asarray(m[key], np.float64)
            if b.shape != (3 * v, k):
                raise ValueError(f"{path}: {key} has shape {b.shape}, expected ({3 * v}, {k})")
            return torch.from_numpy(b)

        tri = torch.from_numpy(np.asarray(m["tri"], np.int64) - 1)
        kp = torch.from_numpy(np.asarray(m["keypoints"], np.int64).reshape(-1) - 1)
        regions = {}
        if "skinmask" in m:
            sk = np.asarray(m["skinmask"]).reshape(-1)
            if sk.shape == (v,):
                regions["skin"] = torch.from_numpy(sk > 0)
        regions.setdefault("face", torch.ones(v, dtype=torch.bool))
        if tri.numel() and int(tri.min()) >= 0 and int(tri.max()) < v and 0 <= int(kp.min()) and int(kp.max()) < v:
            regions.update(regions_from_landmarks(torch.from_numpy(mean), tri, kp))
        tex = np.asarray(m["meantex"], np.float64).reshape(-1, 3) / 255.0
        return cls(torch.from_numpy(mean), base("idBase", ID_DIM), base("exBase", EXP_DIM),
                   torch.from_numpy(tex), base("texBase", TEX_DIM) / 255.0, tri, kp,
                   regions=regions, name="bfm")

    # ------------------------------------------------------------------ model
    @property
    def num_vertices(self) -> int:
        return self.mean_shape.shape[0]

    def region(self, name: str) -> torch.Tensor:
        """``(V,)`` bool mask of a region (``region_names`` lists them)."""
        if name not in self.region_names:
            raise KeyError(f"region {name!r} is not defined; available: {self.region_names}")
        return getattr(self, f"region_{name}")

    def shape(self, id_coeff: torch.Tensor, exp_coeff: torch.Tensor) -> torch.Tensor:
        """Vertices ``(B, V, 3)`` of ``id_coeff: (B, 80)`` and ``exp_coeff: (B, 64)`` (B = 0
        works)."""
        _check_coeff("id_coeff", id_coeff, ID_DIM)
        _check_coeff("exp_coeff", exp_coeff, EXP_DIM)
        if exp_coeff.shape[0] != id_coeff.shape[0]:
            raise ValueError(f"exp_coeff: expected shape ({id_coeff.shape[0]}, {EXP_DIM}) (B of "
                             f"id_coeff), got {tuple(exp_coeff.shape)}")
        d = id_coeff.to(self.id_basis) @ self.id_basis.T + exp_coeff.to(self.exp_basis) @ self.exp_basis.T
        return self.mean_shape + d.view(d.shape[0], self.num_vertices, 3)

    def albedo(self, tex_coeff: torch.Tensor) -> torch.Tensor:
        """Per-vertex albedo ``(B, V, 3)`` of ``tex_coeff: (B, 80)`` (not clamped)."""
        _check_coeff("tex_coeff", tex_coeff, TEX_DIM)
        d = tex_coeff.to(self.tex_basis) @ self.tex_basis.T
        return self.mean_tex + d.view(d.shape[0], self.num_vertices, 3)

    def forward(self, coeffs: torch.Tensor) -> dict[str, torch.Tensor]:
        """``coeffs: (B, 257)`` -> ``verts`` (unposed, BFM units), ``posed`` (R v + t),
        ``normals`` (posed), ``colors`` (albedo x shading), ``landmarks3d`` (posed), all
        ``(B, *, 3)``."""
        _check_coeff("coeffs", coeffs, COEFF_DIM)
        c = split_coeffs(coeffs.float())
        verts = self.shape(c["id"], c["exp"])
        rot = cam.euler_to_rotation(c["angles"])
        posed = verts @ rot.transpose(1, 2) + c["trans"][:, None]
        normals = vertex_normals(verts, self.faces) @ rot.transpose(1, 2)
        colors = self.albedo(c["tex"]) * sh_shading(normals, c["gamma"])
        return {"verts": verts, "posed": posed, "normals": normals, "colors": colors,
                "landmarks3d": posed[:, self.landmarks]}

    # ------------------------------------------------------------------ rendering
    def label_of(self, coeffs: torch.Tensor, focal: float = cam.FFHQ_FOCAL) -> torch.Tensor:
        """EG3D label ``(..., 25)`` of the pose in ``coeffs: (..., 257)`` (no submission
        offsets)."""
        c = split_coeffs(coeffs.float())
        return cam.deep3d_to_label(c["angles"], c["trans"], focal=focal)

    def render(self, coeffs: torch.Tensor, image_size=256, label: torch.Tensor | None = None,
               background: torch.Tensor | None = None, regions: tuple[str, ...] = ()) -> Render:
        """Renders ``coeffs: (B, 257)``.

        Args:
            image_size: ``H`` or ``(H, W)``.
            label: optional EG3D camera ``(B, 25)``. ``None``: the camera of the coefficients'
                pose (:meth:`label_of`). With a label the head is rendered unposed (the
                label is the whole camera) and lit with the label's view rotation.
            background: an image ``(B, 3, H, W)`` (or ``(3, H, W)``, ``(1, 3, H, W)``) or a
                colour ``(3,)``; default black.
            regions: a tuple of region names (``region_names``) to render as masks
                (``Render.regions``).

        ``coeffs`` must be finite where they pose the camera (angles, trans): the camera is
        checked with :func:`~pyface.face.cameras.check_label` (which reads its values).
        """
        _check_coeff("coeffs", coeffs, COEFF_DIM)
        b = coeffs.shape[0]
        h, w = _size(image_size)
        if isinstance(regions, str):
            raise TypeError(f"regions: expected a tuple of region names, got the string "
                            f"{regions!r} (write ({regions!r},))")
        for r in regions:
            self.region(r)
        if background is not None:
            if not isinstance(background, torch.Tensor):
                raise TypeError(f"background: expected a torch.Tensor of shape (B, 3, H, W) or "
                                f"(3,), got {type(background).__name__}")
            ok = (background.shape == (3,) or (background.dim() in (3, 4)
                  and tuple(background.shape[-3:]) == (3, h, w)
                  and (background.dim() == 3 or background.shape[0] in (1, b))))
            if not ok:
                raise ValueError(f"background: expected shape ({b}, 3, {h}, {w}) or (3,), got "
                                 f"{tuple(background.shape)}")
        c = split_coeffs(coeffs.float())
        if label is None:
            label = self.label_of(coeffs)
            what = "coeffs (the camera of its angles 224:227 and trans 254:257)"
        else:
            if not isinstance(label, torch.Tensor):
                raise TypeError(f"label: expected a torch.Tensor of shape ({b}, 25), got "
                                f"{type(label).__name__}")
            if label.shape != (b, 25):
                raise ValueError(f"label: expected shape ({b}, 25), got {tuple(label.shape)}")
            what = "label"
        label = label.float()
        cam.check_label(label, what)
        verts = self.shape(c["id"], c["exp"])
        c2w, _ = cam.split_label(label)
        # view rotation in Deep3DFaceRecon's camera frame (x right, y up, z to the camera)
        flip = torch.diag(c2w.new_tensor([1.0, -1.0, -1.0]))
        rot = (c2w[:, :3, :3] @ flip).transpose(1, 2)
        normals = vertex_normals(verts, self.faces) @ rot.transpose(1, 2)
        colors = (self.albedo(c["tex"]).clamp(0, 1) * sh_shading(normals, c["gamma"])).clamp(0, 1)
        world = verts * cam.BFM_TO_EG3D_SCALE
        uv, z = cam.project_label(world, label)
        ndc = torch.cat([uv * 2 - 1, z], dim=-1)
        attrs = [colors]
        for r in regions:
            attrs.append(self.region(r).to(colors).expand(b, -1).unsqueeze(-1))
        out = render_mesh(ndc, self.faces, image_size, torch.cat(attrs, -1), cull=self.cull)
        h, w = out.mask.shape[-2:]
        img = out.attr_image[:, :3]
        if background is None:
            background = torch.zeros(3, device=img.device)
        bg = background.view(1, 3, 1, 1) if background.dim() == 1 else background
        image = img * out.mask + bg.to(img) * (1 - out.mask)
        lm_uv, _ = cam.project_label(world[:, self.landmarks], label)
        lms = lm_uv * lm_uv.new_tensor([w, h])
        reg = None
        if regions:
            reg = {r: (out.attr_image[:, 3 + i:4 + i] > 0.5).to(img) for i, r in enumerate(regions)}
        return Render(image=image, mask=out.mask, depth=out.depth, landmarks=lms,
                      face_index=out.face_index, label=label, regions=reg)

    def render_canonical(self, coeffs: torch.Tensor, image_size=256, **kw) -> Render:
        """Frontal render with the pose removed (angles = trans = 0): the fixed canonical view of
        GOHA's expression branch (camera at (0, 0, 2.7) looking at the origin).
        ``coeffs: (B, 257)``; ``kw``: :meth:`render`'s ``background`` and ``regions``."""
        _check_coeff("coeffs", coeffs, COEFF_DIM)
        c = coeffs.clone()
        c[:, 224:227] = 0
        c[:, 254:257] = 0
        return self.render(c, image_size, **kw)

    def landmarks2d(self, coeffs: torch.Tensor, label: torch.Tensor | None = None,
                    image_size=256) -> torch.Tensor:
        """68 projected landmarks ``(B, 68, 2)`` in pixels of ``coeffs: (B, 257)`` seen by
        ``label: (B, 25)`` (default: the pose's camera, :meth:`label_of`) on an ``image_size``
        (``H`` or ``(H, W)``) image, without rendering."""
        _check_coeff("coeffs", coeffs, COEFF_DIM)
        h, w = _size(image_size)
        c = split_coeffs(coeffs.float())
        if label is not None and (not isinstance(label, torch.Tensor)
                                  or label.shape != (coeffs.shape[0], 25)):
            raise ValueError(f"label: expected a tensor of shape ({coeffs.shape[0]}, 25), got "
                             f"{tuple(label.shape) if isinstance(label, torch.Tensor) else label!r}")
        label = self.label_of(coeffs) if label is None else label.float()
        verts = self.shape(c["id"], c["exp"])[:, self.landmarks] * cam.BFM_TO_EG3D_SCALE
        uv, _ = cam.project_label(verts, label)
        return uv * uv.new_tensor([w, h])


def _check_coeff(name, x, n):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (B, {n}), got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != n:
        raise ValueError(f"{name}: expected shape (B, {n}), got {tuple(x.shape)}")


@functools.lru_cache(maxsize=1)
def _builtin_cached() -> MorphableModel:
    from pyface.face.procedural import ID_STD, build_head

    p = build_head()
    v = p.verts.shape[0]
    t = lambda a: torch.from_numpy(a)
    m = MorphableModel(t(p.verts), t(p.id_basis.reshape(v * 3, -1)), t(p.exp_basis.reshape(v * 3, -1)),
                       t(p.mean_tex), t(p.tex_basis.reshape(v * 3, -1)), t(p.faces), t(p.landmarks),
                       regions={k: t(m_) for k, m_ in p.regions.items()}, name="builtin",
                       id_names=p.id_names, exp_names=p.exp_names, tex_names=p.tex_names)
    m.register_buffer("mirror_index", t(p.mirror))
    m.cull = "cw"
    # the identity prior's standard deviations (80,): a plain attribute, not a buffer, so the
    # state dicts of modules holding the model do not change
    m.id_std = torch.tensor(ID_STD, dtype=torch.float32)
    return m
