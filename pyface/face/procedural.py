"""The built-in procedural head model (``MorphableModel.builtin()``), generated from code.

Everything is deterministic (fixed seeds, no data file). Units and frame are those of the BFM as
Deep3DFaceRecon uses it: about 1 unit = 10 cm, y up, the face looking along +z, the origin near
the middle of the face, so Deep3DFaceRecon's camera (distance 10) and EG3D's conversion (x 0.27)
apply unchanged.

Components (all closed or attached surfaces, outward winding):

* the head sheet: a lofted surface of elliptic cross-sections from the crown to the bottom of
  the neck (longitudes denser on the face), with nose, brow ridge, cheekbones, eye sockets,
  eyeballs, lips and chin as displacement fields, and a hair cap; four coincident rows at the
  mouth line form the mouth slit: the two inner rows carry the mouth interior colour and open
  when the jaw (or lip) components pull them apart, and are degenerate (invisible) otherwise;
* two ears (flattened ellipsoids, mirror images);
* two upper eyelids (skin patches in front of the eyeballs); the blink components slide their
  margins down over the eyes.

Identity (80 slots, 48 used) and expression (64 slots, 25 used) components are displacement
fields in units where a coefficient of 1 is one standard deviation of the identity prior, or the
full extent of an expression (``jaw_open = 1`` is a wide-open mouth). Texture (80 slots, 49 used):
region colour offsets (0.1 albedo per unit) and procedural detail fields.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

ID_NAMES = [
    "head_width", "head_height", "head_depth", "face_length", "jaw_width", "chin_projection",
    "chin_height", "cheekbones", "nose_length", "nose_projection", "nose_width", "nose_bridge",
    "eye_spacing", "eye_height", "eye_size", "brow_ridge", "forehead_slope", "upper_lip",
    "lower_lip", "mouth_width", "mouth_height", "ear_size", "ear_protrusion", "neck_width",
    "hair_volume", "hair_top", "cheek_fullness", "temple_width", "face_flatness", "occiput",
] + [f"shape_lowfreq_{i}" for i in range(14)] + [f"asym_{i}" for i in range(4)]


def id_prior_std(name: str) -> float:
    """Standard deviation of an identity coefficient in the head's shape prior: 1 for the named
    components, 0.8 for the low-frequency fields, 0.5 for the asymmetric ones (the synthetic
    identities are drawn from it, :func:`pyface.data.synthetic.sample_identity`)."""
    return 0.8 if name.startswith("shape_lowfreq") else 0.5 if name.startswith("asym") else 1.0


#: ``(80,)`` the identity prior's standard deviations by slot (unused slots: 1).
ID_STD = tuple([id_prior_std(n) for n in ID_NAMES] + [1.0] * (80 - len(ID_NAMES)))

EXP_NAMES = [
    "jaw_open", "smile", "smile_left", "smile_right", "lip_pucker", "blink_left", "blink_right",
    "brow_raise", "brow_frown", "brow_raise_left", "brow_raise_right", "mouth_stretch",
    "mouth_left", "mouth_right", "lip_funnel", "cheek_puff", "jaw_left", "jaw_right",
    "upper_lip_raise", "lower_lip_down", "mouth_frown", "nose_wrinkle", "squint_left",
    "squint_right", "jaw_forward",
]

TEX_NAMES = (["skin_r", "skin_g", "skin_b", "hair_r", "hair_g", "hair_b", "iris_r", "iris_g",
              "iris_b", "lip_r", "lip_g", "lip_b", "cheek_blush", "skin_tan", "brow_dark"]
             + [f"skin_detail_{i}" for i in range(20)] + [f"hair_detail_{i}" for i in range(10)]
             + [f"iris_detail_{i}" for i in range(4)])

REGIONS = ("face", "skin", "hair", "ears", "neck", "nose", "brows", "left_brow", "right_brow",
           "eyes", "left_eye", "right_eye", "mouth", "lips", "mouth_interior", "eyelids")

# feature layout (BFM units). "right" is the subject's right (x < 0, image left).
EYE_C = (0.33, 0.30)          # |x|, y of the eye centres
EYE_R = (0.14, 0.062)         # eye-opening half axes
IRIS_R, PUPIL_R = 0.05, 0.021
MOUTH_Y, MOUTH_HW = -0.43, 0.25
BROW_Y = 0.52


def _smoothstep(e0, e1, x):
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _sign(x):
    """sign() that is exactly odd on the mesh (points within 1e-9 of x = 0 count as 0)."""
    return np.where(np.abs(x) < 1e-9, 0.0, np.sign(x))


def _gauss(x, y, cx, cy, sx, sy):
    return np.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))


def _pchip(xk, yk):
    from scipy.interpolate import PchipInterpolator
    return PchipInterpolator(np.asarray(xk, float), np.asarray(yk, float))


# cross-section profile from the crown (t = 0) to the bottom of the neck (t = 1):
#        t      y      a     bf     bb     zc
_PROFILE = np.array([
    [0.00, 1.45, 0.00, 0.00, 0.00, -0.25],
    [0.05, 1.42, 0.30, 0.32, 0.36, -0.25],
    [0.12, 1.32, 0.54, 0.58, 0.66, -0.23],
    [0.22, 1.10, 0.70, 0.77, 0.87, -0.21],
    [0.32, 0.82, 0.76, 0.84, 0.94, -0.20],
    [0.42, 0.52, 0.77, 0.86, 0.96, -0.20],
    [0.50, 0.28, 0.76, 0.85, 0.93, -0.20],
    [0.58, 0.03, 0.74, 0.84, 0.85, -0.21],
    [0.65, -0.24, 0.69, 0.82, 0.74, -0.23],
    [0.71, -0.48, 0.61, 0.78, 0.62, -0.25],
    [0.77, -0.74, 0.50, 0.70, 0.52, -0.28],
    [0.82, -0.93, 0.41, 0.50, 0.48, -0.30],
    [0.86, -1.03, 0.38, 0.30, 0.46, -0.32],
    [0.92, -1.40, 0.38, 0.35, 0.42, -0.35],
    [0.97, -1.90, 0.42, 0.40, 0.45, -0.35],
    [1.00, -1.90, 0.00, 0.00, 0.00, -0.35],
])


def _theta_of_s(s):
    """Longitude of the column parameter s in [-1, 1): denser towards the face (s = 0)."""
    return math.pi * s - 0.6 * np.sin(math.pi * s)


def _hairline(theta):
    """Height of the hairline as a function of longitude (front high, nape low)."""
    c = np.abs(theta) / math.pi
    return np.interp(c, [0.0, 0.25, 0.45, 0.6, 1.0], [0.86, 0.70, 0.28, -0.10, -0.45])


def _nose(x, y):
    h = np.clip(_pchip([-0.22, -0.16, -0.10, -0.02, 0.05, 0.25, 0.45, 0.62, 0.8],
                       [0.0, 0.02, 0.13, 0.27, 0.26, 0.14, 0.07, 0.02, 0.0])(np.clip(y, -0.22, 0.8)), 0, None)
    sx = _pchip([-0.22, -0.05, 0.1, 0.3, 0.6, 0.8], [0.17, 0.15, 0.12, 0.08, 0.07, 0.07])(np.clip(y, -0.22, 0.8))
    return h * np.exp(-0.5 * (x / sx) ** 2) * (y > -0.22) * (y < 0.8)


def _eye_socket(x, y):
    return sum(_gauss(x, y, sgn * EYE_C[0], EYE_C[1] + 0.01, 0.15, 0.09) for sgn in (-1, 1))


def _eye_ellipse(x, y, sgn):
    return ((x - sgn * EYE_C[0]) / EYE_R[0]) ** 2 + ((y - EYE_C[1]) / EYE_R[1]) ** 2


def _face_features(x, y):
    """Displacement along +z of the base loft at (x, y): the face relief."""
    d = _nose(x, y)
    d = d - 0.085 * _eye_socket(x, y)
    for sgn in (-1, 1):  # eyeballs: a low dome inside the eye opening
        e = _eye_ellipse(x, y, sgn)
        d = d + 0.035 * np.clip(1.3 - e, 0, None) / 1.3
    d = d + 0.05 * _gauss(x, y, 0, BROW_Y + 0.02, 0.35, 0.06)
    d = d + sum(0.045 * _gauss(x, y, s * 0.46, 0.05, 0.11, 0.12) for s in (-1, 1))
    d = d + 0.065 * _gauss(x, y, 0, -0.35, 0.17, 0.045)
    d = d + 0.06 * _gauss(x, y, 0, -0.51, 0.16, 0.05)
    d = d - 0.03 * _gauss(x, y, 0, -0.63, 0.16, 0.04)
    d = d + 0.06 * _gauss(x, y, 0, -0.80, 0.14, 0.07)
    return d


@dataclass
class HeadParts:
    """Raw arrays of the built-in head (float64 numpy)."""

    verts: np.ndarray                  # (V, 3)
    faces: np.ndarray                  # (F, 3) int64
    id_basis: np.ndarray               # (V, 3, 80)
    exp_basis: np.ndarray              # (V, 3, 64)
    mean_tex: np.ndarray               # (V, 3) in [0, 1]
    tex_basis: np.ndarray              # (V, 3, 80)
    landmarks: np.ndarray              # (68,) int64
    regions: dict = field(default_factory=dict)   # name -> (V,) bool
    id_names: list = field(default_factory=list)
    exp_names: list = field(default_factory=list)
    tex_names: list = field(default_factory=list)
    mirror: np.ndarray | None = None   # (V,) index of each vertex's mirror image


def _grid_faces(rows, cols, offset, wrap):
    """Two triangles per quad of a rows x cols vertex grid (row-major), optional wrap in cols."""
    r, c = np.meshgrid(np.arange(rows - 1), np.arange(cols if wrap else cols - 1), indexing="ij")
    r, c = r.ravel(), c.ravel()
    c1 = (c + 1) % cols
    a, b, d, e = r * cols + c, r * cols + c1, (r + 1) * cols + c1, (r + 1) * cols + c
    f = np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, e], 1)])
    return f + offset


def _orient(verts, faces, outward_from=None, direction=None):
    """Flips all faces if their normals point mostly inward (or against ``direction``)."""
    p = verts[faces]
    n = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
    ref = (p.mean(1) - outward_from) if direction is None else np.broadcast_to(direction, n.shape)
    if np.sum(np.einsum("ij,ij->i", n, ref)) < 0:
        faces = faces[:, [0, 2, 1]]
    return faces


def build_head(n_cols: int = 144, n_rows: int = 124) -> HeadParts:
    if n_cols % 2:
        raise ValueError(f"n_cols: expected an even number, got {n_cols}")
    prof = {k: _pchip(_PROFILE[:, 0], _PROFILE[:, i]) for i, k in enumerate("tyabwz") if k != "t"}
    # row parameters: denser on the face, four coincident rows at the mouth line
    fine = np.linspace(0, 1, 4001)
    density = 1.0 + 2.2 * np.exp(-0.5 * ((fine - 0.6) / 0.13) ** 2)
    cdf = np.concatenate([[0], np.cumsum(0.5 * (density[1:] + density[:-1]))])
    cdf /= cdf[-1]
    t_rows = np.interp(np.linspace(0, 1, n_rows), cdf, fine)
    ys = prof["y"](fine)
    t_mouth = fine[np.argmin(np.abs(ys - MOUTH_Y) + 10 * (fine < 0.5))]
    t_rows = t_rows[np.abs(t_rows - t_mouth) > 0.35 / n_rows]
    k_mouth = int(np.searchsorted(t_rows, t_mouth))
    t_rows = np.concatenate([t_rows[:k_mouth], [t_mouth] * 4, t_rows[k_mouth:]])
    rows = len(t_rows)
    mouth_rows = np.arange(k_mouth, k_mouth + 4)       # U, U', L', L

    s = -1.0 + 2.0 * np.arange(n_cols) / n_cols
    theta = _theta_of_s(s)
    T, TH = np.meshgrid(t_rows, theta, indexing="ij")
    y = prof["y"](T)
    a, bf, bb, zc = prof["a"](T), prof["b"](T), prof["w"](T), prof["z"](T)
    ct, st = np.cos(TH), np.sin(TH)
    x = a * st
    z = zc + np.where(ct > 0, bf, bb) * ct
    front = _smoothstep(0.0, 0.35, ct)
    z = z + front * _face_features(x, y)
    # hair cap: a layer of hair thickness above the hairline
    hl = _hairline(TH)
    hair_w = _smoothstep(hl - 0.05, hl + 0.08, y) * (T < 0.93)
    nrm = np.stack([st, np.zeros_like(st), ct], -1)
    sheet = np.stack([x, y, z], -1) + 0.06 * hair_w[..., None] * nrm
    sheet_v = sheet.reshape(-1, 3)
    n_sheet = sheet_v.shape[0]
    row_of = np.repeat(np.arange(rows), n_cols)
    col_of = np.tile(np.arange(n_cols), rows)
    sheet_f = _grid_faces(rows, n_cols, 0, wrap=True)
    sheet_f = _orient(sheet_v, sheet_f, outward_from=np.array([0.0, 0.0, -0.25]))
    sheet_mirror = row_of * n_cols + (n_cols - col_of) % n_cols

    # ---- ears (right ear built, left ear mirrored)
    def ear(sgn):
        nu, nv = 18, 12
        u = np.linspace(0, 2 * math.pi, nu, endpoint=False)
        v = np.linspace(0, math.pi, nv)
        U, Vv = np.meshgrid(u, v, indexing="ij")
        loc = np.stack([0.05 * np.sin(Vv) * np.cos(U), 0.29 * np.cos(Vv), 0.16 * np.sin(Vv) * np.sin(U)], -1)
        ang = math.radians(25)  # tilt the ear's outer face forward
        rot = np.array([[math.cos(ang), 0, math.sin(ang)], [0, 1, 0], [-math.sin(ang), 0, math.cos(ang)]])
        p = loc.reshape(-1, 3) @ rot.T + np.array([-0.80, 0.22, -0.17])
        f = _grid_faces(nu, nv, 0, wrap=False)  # rows = u (wrap handled below)
        # wrap u: connect the last u row to the first
        last = np.stack([np.arange(nv - 1) + (nu - 1) * nv, np.arange(nv - 1) + 1 + (nu - 1) * nv,
                         np.arange(nv - 1) + 1, np.arange(nv - 1)], 1)
        f = np.concatenate([f, last[:, [0, 1, 2]], last[:, [0, 2, 3]]])
        if sgn > 0:
            p = p * np.array([-1.0, 1.0, 1.0])
        f = _orient(p, f, outward_from=p.mean(0))
        return p, f

    ear_r, ear_rf = ear(-1)
    ear_l, ear_lf = ear(+1)
    n_ear = ear_r.shape[0]

    # ---- eyelids: patches in front of the eyeballs, placed on the analytic front surface
    t_fine = np.linspace(0.0, 0.9, 9001)
    y_fine = prof["y"](t_fine)                  # decreasing from the crown to the neck

    def zsurf(xq, yq):
        tq = np.interp(yq, y_fine[::-1], t_fine[::-1])
        aq = prof["a"](tq)
        thq = np.arcsin(np.clip(xq / aq, -1.0, 1.0))
        cq = np.cos(thq)
        return prof["z"](tq) + prof["b"](tq) * cq + _smoothstep(0.0, 0.35, cq) * _face_features(xq, yq)

    lid_nu, lid_nv, lid_off = 15, 6, 0.03

    def lid(sgn):
        u = np.linspace(-1.08, 1.08, lid_nu)
        hh = np.sqrt(np.clip(1 - np.clip(np.abs(u), 0, 1) ** 2, 0, None))
        xs = sgn * EYE_C[0] + u * EYE_R[0]
        top = EYE_C[1] + EYE_R[1] * (1.25 * hh) + 0.012
        rest = EYE_C[1] + EYE_R[1] * 0.45 * hh
        closed = EYE_C[1] - EYE_R[1] * 1.05 * hh - 0.006
        k = np.linspace(0, 1, lid_nv)[None, :]
        yr = top[:, None] + k * (rest - top)[:, None]
        yc = top[:, None] + k * (closed - top)[:, None]
        X = np.repeat(xs[:, None], lid_nv, 1)
        pr = np.stack([X, yr, zsurf(X, yr) + lid_off], -1).reshape(-1, 3)
        pc = np.stack([X, yc, zsurf(X, yc) + lid_off], -1).reshape(-1, 3)
        f = _grid_faces(lid_nu, lid_nv, 0, wrap=False)
        f = _orient(pr, f, direction=np.array([0.0, 0.0, 1.0]))
        return pr, pc - pr, f

    lid_r, blink_r, lid_rf = lid(-1)
    lid_l, blink_l, lid_lf = lid(+1)
    n_lid = lid_r.shape[0]
    if not (np.isfinite(lid_r).all() and np.isfinite(blink_r).all()):
        raise RuntimeError("eyelid construction left the face sheet")

    # ---- assemble
    o_er = n_sheet
    o_el = o_er + n_ear
    o_lr = o_el + n_ear
    o_ll = o_lr + n_lid
    V = o_ll + n_lid
    verts = np.concatenate([sheet_v, ear_r, ear_l, lid_r, lid_l])
    faces = np.concatenate([sheet_f, ear_rf + o_er, ear_lf + o_el, lid_rf + o_lr, lid_lf + o_ll]).astype(np.int64)
    mirror = np.concatenate([sheet_mirror, np.arange(n_ear) + o_el, np.arange(n_ear) + o_er,
                             (np.arange(n_lid) + o_ll), (np.arange(n_lid) + o_lr)])
    # lids: mirror index of vertex (iu, iv) is (nu - 1 - iu, iv) in the other lid
    iu, iv = np.divmod(np.arange(n_lid), lid_nv)
    lid_m = (lid_nu - 1 - iu) * lid_nv + iv
    mirror[o_lr:o_ll] = lid_m + o_ll
    mirror[o_ll:V] = lid_m + o_lr

    comp = np.zeros(V, dtype=np.int64)  # 0 sheet, 1 ears, 2 lids
    comp[o_er:o_lr] = 1
    comp[o_lr:] = 2
    X, Y, Z = verts[:, 0], verts[:, 1], verts[:, 2]
    is_sheet = comp == 0
    vrow = np.full(V, -1)
    vrow[:n_sheet] = row_of
    vtheta = np.zeros(V)
    vtheta[:n_sheet] = theta[col_of]
    vtheta[~is_sheet] = np.arctan2(X[~is_sheet], Z[~is_sheet] + 0.25)
    upper_slit = np.isin(vrow, mouth_rows[:2])      # U, U' (with the upper face)
    lower_mask = np.zeros(V, bool)
    lower_mask[:n_sheet] = row_of >= mouth_rows[2]  # L', L and below
    inner = np.isin(vrow, mouth_rows[1:3])          # U', L'
    frontness = _smoothstep(-0.05, 0.45, np.cos(vtheta))

    # ---- regions
    hair = is_sheet & (Y > _hairline(vtheta) + 0.01) & (Y > -1.0)
    ears = comp == 1
    lids = comp == 2
    mouth_ell = (X / 0.29) ** 2 + ((Y - MOUTH_Y) / 0.13) ** 2 < 1
    front = np.cos(vtheta) > math.cos(math.radians(72))
    face = ((is_sheet & front & (Y > -1.0) & ~hair) | lids)
    eye_r = is_sheet & (_eye_ellipse(X, Y, -1) < 1) & (Z > 0.3)
    eye_l = is_sheet & (_eye_ellipse(X, Y, +1) < 1) & (Z > 0.3)
    brow_curve = BROW_Y + 0.05 * (1 - ((np.abs(X) - 0.32) / 0.23) ** 2)
    brow = is_sheet & face & (np.abs(X) > 0.09) & (np.abs(X) < 0.56) & (np.abs(Y - brow_curve) < 0.04)
    mouth_interior = inner & (np.abs(X) < MOUTH_HW) & face
    lips = is_sheet & face & mouth_ell & ~mouth_interior & (
        (np.abs(Y - MOUTH_Y) < 0.11 * np.sqrt(np.clip(1 - (X / 0.27) ** 2, 0, 1)) + 0.005))
    nose = is_sheet & face & (_nose(X, Y) > 0.03)
    neck = is_sheet & (Y <= -1.0) & ~hair | (is_sheet & ~hair & ~front & (Y < -0.2))
    neck &= ~face
    skin = ~hair & ~eye_r & ~eye_l & ~brow & ~mouth_interior
    regions = {
        "face": face, "skin": skin, "hair": hair, "ears": ears, "neck": neck, "nose": nose,
        "brows": brow, "left_brow": brow & (X > 0), "right_brow": brow & (X < 0),
        "eyes": eye_r | eye_l, "left_eye": eye_l, "right_eye": eye_r,
        "mouth": (lips | mouth_interior), "lips": lips, "mouth_interior": mouth_interior,
        "eyelids": lids,
    }

    # ---- identity basis (displacements per unit coefficient)
    ones = np.ones(V)
    id_b = np.zeros((V, 3, 80))
    above_neck = _smoothstep(-1.25, -0.95, Y)
    jaw_w = _smoothstep(0.0, -0.35, Y) * above_neck
    cols = []

    def add(dx=0.0, dy=0.0, dz=0.0):
        cols.append(np.stack([dx * ones, dy * ones, dz * ones], -1))

    zc0 = -0.22
    add(dx=0.05 * X * above_neck)                                          # head_width
    add(dy=0.05 * np.clip(Y, 0, None))                                     # head_height
    add(dz=0.05 * np.clip(zc0 - Z, 0, None) * above_neck)                 # head_depth
    add(dy=0.06 * np.clip(Y, -1.1, 0) * above_neck)                        # face_length
    add(dx=0.08 * X * jaw_w * frontness)                                   # jaw_width
    add(dz=0.05 * _gauss(X, Y, 0, -0.82, 0.2, 0.12) * frontness)          # chin_projection
    add(dy=-0.04 * _gauss(X, Y, 0, -0.85, 0.25, 0.15) * frontness)        # chin_height
    add(dx=0.04 * _sign(X) * sum(_gauss(X, Y, s * 0.5, 0.05, 0.15, 0.14) for s in (-1, 1)),
        dz=0.03 * sum(_gauss(X, Y, s * 0.46, 0.05, 0.12, 0.12) for s in (-1, 1)) * frontness)
    nb = _nose(X, Y) * frontness * is_sheet
    add(dy=-0.04 * (nb > 1e-3) * _gauss(X, Y, 0, 0.0, 0.2, 0.15))       # nose_length
    add(dz=0.25 * nb)                                                      # nose_projection
    add(dx=0.25 * X * (nb > 1e-4) * _smoothstep(0.45, 0.0, Y) * _gauss(X, Y, 0, -0.05, 0.2, 0.2))
    add(dz=0.05 * _gauss(X, Y, 0, 0.35, 0.06, 0.15) * frontness)          # nose_bridge
    eye_g = sum(_gauss(X, Y, s * EYE_C[0], EYE_C[1], 0.14, 0.12) for s in (-1, 1)) * frontness
    add(dx=0.025 * _sign(X) * eye_g)                                     # eye_spacing
    add(dy=0.025 * eye_g)                                                  # eye_height
    add(dx=0.12 * (X - _sign(X) * EYE_C[0]) * eye_g, dy=0.12 * (Y - EYE_C[1]) * eye_g)  # eye_size
    add(dz=0.035 * _gauss(X, Y, 0, BROW_Y + 0.02, 0.35, 0.07) * frontness)  # brow_ridge
    add(dz=0.04 * _smoothstep(0.55, 1.2, Y) * frontness * (Y - 0.55))      # forehead_slope
    add(dz=0.03 * _gauss(X, Y, 0, -0.36, 0.17, 0.05) * frontness * ~lower_mask)   # upper_lip
    add(dz=0.03 * _gauss(X, Y, 0, -0.51, 0.16, 0.05) * frontness * lower_mask)    # lower_lip
    mg = _gauss(X, Y, 0, MOUTH_Y, 0.3, 0.12) * frontness
    add(dx=0.08 * X * mg)                                                  # mouth_width
    add(dy=0.03 * mg)                                                      # mouth_height
    ear_c = np.array([0.80, 0.22, -0.17])
    add(dx=0.12 * (X - _sign(X) * ear_c[0]) * ears, dy=0.12 * (Y - ear_c[1]) * ears,
        dz=0.12 * (Z - ear_c[2]) * ears)                                   # ear_size
    add(dx=0.06 * _sign(X) * ears * np.clip(ear_c[2] - Z + 0.2, 0, None))  # ear_protrusion
    add(dx=0.05 * X * _smoothstep(-0.9, -1.3, Y), dz=0.05 * (Z + 0.35) * _smoothstep(-0.9, -1.3, Y))
    hair_soft = _smoothstep(_hairline(vtheta) - 0.05, _hairline(vtheta) + 0.1, Y) * is_sheet * (Y > -1.0)
    vn = np.stack([np.sin(vtheta), np.zeros(V), np.cos(vtheta)], -1)
    add(dx=0.04 * hair_soft * vn[:, 0], dz=0.04 * hair_soft * vn[:, 2])   # hair_volume
    add(dy=0.05 * hair_soft * _smoothstep(0.8, 1.4, Y))                   # hair_top
    add(dx=0.03 * _sign(X) * sum(_gauss(X, Y, s * 0.55, -0.25, 0.15, 0.18) for s in (-1, 1)))
    add(dx=0.03 * _sign(X) * sum(_gauss(X, Y, s * 0.65, 0.7, 0.15, 0.2) for s in (-1, 1)))
    add(dz=0.05 * (Z - 0.4) * frontness * above_neck * (Z > 0.4))          # face_flatness
    add(dz=-0.04 * _gauss(X, Y, 0, 0.4, 0.5, 0.4) * (Z < -0.6))            # occiput
    # low-frequency symmetric radial fields, then small asymmetric ones
    rad = np.stack([np.sin(vtheta), np.zeros(V), np.cos(vtheta)], -1)
    phi = np.clip((Y + 1.0) / 2.5, 0, 1) * math.pi
    k = 0
    for m in range(1, 4):
        for l_ in range(0, 5):
            if k >= 14:
                break
            f = np.cos(m * vtheta * 0.5) * np.cos(l_ * phi) * above_neck * 0.02
            cols.append(rad * f[:, None])
            k += 1
    for i in range(4):
        f = np.sin((i % 2 + 1) * vtheta) * np.cos((i // 2 + 1) * phi) * above_neck * 0.012
        cols.append(rad * f[:, None])
    assert len(cols) == len(ID_NAMES), (len(cols), len(ID_NAMES))
    for i, c in enumerate(cols):
        id_b[:, :, i] = c

    # ---- expression basis
    exp_b = np.zeros((V, 3, 64))
    cols = []
    upper_face_fall = _smoothstep(MOUTH_Y + 0.25, MOUTH_Y, Y)
    mouth_open_w = np.clip(1 - (X / MOUTH_HW) ** 2, 0, 1) ** 0.7
    sides = _smoothstep(0.78, 0.45, np.abs(X))
    jaw_region = (lower_mask * sides * _smoothstep(-1.4, -1.0, Y) * frontness) + 0.0

    def jaw_move(d):
        """Lower-jaw displacement d (3,), opening only inside the mouth."""
        lo = jaw_region[:, None] * np.asarray(d)[None]
        # upper side of the slit and the cheeks above follow with the closed-mouth share
        up_w = (~lower_mask) * (1 - mouth_open_w) * sides * upper_face_fall * frontness
        up = up_w[:, None] * np.asarray(d)[None]
        return lo + up

    cols.append(jaw_move([0.0, -0.20, -0.05]))                              # jaw_open
    corner = [np.stack([np.full(V, s * 1.0), ones, -0.3 * ones], -1) *
              _gauss(X, Y, s * MOUTH_HW, MOUTH_Y, 0.12, 0.1)[:, None] * frontness[:, None] for s in (-1, 1)]
    cheek_up = [(_gauss(X, Y, s * 0.42, -0.05, 0.15, 0.15) * frontness)[:, None] * np.array([0, 0.03, 0.015]) for s in (-1, 1)]
    smile_r = 0.05 * corner[0] + cheek_up[0]
    smile_l = 0.05 * corner[1] + cheek_up[1]
    cols.append(smile_r + smile_l)                                          # smile
    cols.append(smile_l)
    cols.append(smile_r)
    mouth_zone = (_gauss(X, Y, 0, MOUTH_Y, 0.2, 0.09) * frontness)[:, None]
    cols.append(mouth_zone * np.stack([-0.35 * X, np.zeros(V), 0.08 * ones], -1))  # lip_pucker
    blink = np.zeros((V, 3))
    blink_l_full = blink.copy()
    blink_l_full[o_ll:V] = blink_l
    blink_r_full = blink.copy()
    blink_r_full[o_lr:o_ll] = blink_r
    cols.append(blink_l_full)
    cols.append(blink_r_full)
    brow_zone = [(_gauss(X, Y, s * 0.33, BROW_Y, 0.2, 0.12) * frontness)[:, None] for s in (-1, 1)]
    cols.append((brow_zone[0] + brow_zone[1]) * np.array([0, 0.06, 0.0]))  # brow_raise
    cols.append((brow_zone[0] * np.array([1, 0, 0]) + brow_zone[1] * np.array([-1, 0, 0])) * 0.04
                + (brow_zone[0] + brow_zone[1]) * np.array([0, -0.035, 0.01]))   # brow_frown
    cols.append(brow_zone[1] * np.array([0, 0.06, 0.0]))                    # brow_raise_left
    cols.append(brow_zone[0] * np.array([0, 0.06, 0.0]))                    # brow_raise_right
    cols.append(mouth_zone * np.stack([0.3 * X, np.zeros(V), -0.02 * ones], -1))   # mouth_stretch
    cols.append(mouth_zone * np.array([0.06, 0, 0]))                          # mouth_left
    cols.append(mouth_zone * np.array([-0.06, 0, 0]))                         # mouth_right
    cols.append(jaw_move([0.0, -0.06, 0.0]) + mouth_zone * np.stack([-0.2 * X, np.zeros(V), 0.05 * ones], -1))
    cols.append((sum(_gauss(X, Y, s * 0.45, -0.3, 0.14, 0.14) for s in (-1, 1)) * frontness)[:, None]
                * np.stack([0.05 * _sign(X), np.zeros(V), 0.04 * ones], -1))  # cheek_puff
    cols.append(jaw_move([0.06, 0.0, 0.0]))                                  # jaw_left
    cols.append(jaw_move([-0.06, 0.0, 0.0]))                                 # jaw_right
    ul = (upper_slit | ((~lower_mask) & (Y < MOUTH_Y + 0.12))) * _gauss(X, Y, 0, MOUTH_Y, 0.18, 0.1) * frontness
    cols.append(ul[:, None] * np.array([0, 0.05, 0.01]))                     # upper_lip_raise
    ll = lower_mask * _gauss(X, Y, 0, MOUTH_Y, 0.18, 0.1) * frontness
    cols.append(ll[:, None] * np.array([0, -0.05, 0.01]))                    # lower_lip_down
    cols.append(-0.6 * (0.05 * corner[0] + 0.05 * corner[1]) * np.array([0.3, 1.0, 1.0]))  # mouth_frown
    cols.append((_gauss(X, Y, 0, 0.2, 0.18, 0.12) * frontness)[:, None] * np.array([0, 0.03, 0.01]))
    for blink_x, s in ((blink_l_full, 1), (blink_r_full, -1)):               # squint_left, squint_right
        cols.append(0.3 * blink_x + (_gauss(X, Y, s * 0.35, 0.1, 0.15, 0.1) * frontness)[:, None] * np.array([0, 0.03, 0.01]))
    cols.append(jaw_move([0.0, 0.0, 0.06]))                                  # jaw_forward
    assert len(cols) == len(EXP_NAMES), (len(cols), len(EXP_NAMES))
    for i, c in enumerate(cols):
        exp_b[:, :, i] = c
    # the four mouth-slit rows must move together in pairs: U with U', L' with L
    for r0, r1 in ((mouth_rows[0], mouth_rows[1]), (mouth_rows[2], mouth_rows[3])):
        a_idx = np.arange(n_cols) + r0 * n_cols
        b_idx = np.arange(n_cols) + r1 * n_cols
        avg_i = 0.5 * (id_b[a_idx] + id_b[b_idx])
        avg_e = 0.5 * (exp_b[a_idx] + exp_b[b_idx])
        id_b[a_idx] = id_b[b_idx] = avg_i
        exp_b[a_idx] = exp_b[b_idx] = avg_e
    # the upper pair and the lower pair share the identity displacement (closed mouth at rest)
    a_idx = np.arange(n_cols) + mouth_rows[0] * n_cols
    b_idx = np.arange(n_cols) + mouth_rows[2] * n_cols
    avg = 0.5 * (id_b[a_idx] + id_b[b_idx])
    for r in mouth_rows:
        id_b[np.arange(n_cols) + r * n_cols] = avg

    # ---- texture: soft region weights, so colour boundaries do not follow the mesh edges
    is_s = is_sheet.astype(float)
    hl_v = _hairline(vtheta)
    w_hair = _smoothstep(hl_v - 0.01, hl_v + 0.05, Y) * _smoothstep(-1.05, -0.98, Y) * is_s
    ax = np.abs(X)
    w_brow = ((1 - _smoothstep(0.022, 0.045, np.abs(Y - brow_curve))) * _smoothstep(0.08, 0.12, ax)
              * (1 - _smoothstep(0.53, 0.57, ax)) * (face & is_sheet))
    r_lip = (X / 0.27) ** 2 + ((Y - MOUTH_Y) / 0.11) ** 2
    w_lip = (1 - _smoothstep(0.7, 1.1, r_lip)) * (face & is_sheet & ~mouth_interior)
    eyes = eye_r | eye_l
    er = np.sqrt(np.minimum(((X - EYE_C[0]) ** 2 + (Y - EYE_C[1]) ** 2),
                            ((X + EYE_C[0]) ** 2 + (Y - EYE_C[1]) ** 2)))
    w_iris = (1 - _smoothstep(IRIS_R - 0.006, IRIS_R + 0.006, er)) * eyes
    w_pupil = (1 - _smoothstep(PUPIL_R - 0.005, PUPIL_R + 0.005, er)) * eyes
    w_iris_only = np.clip(w_iris - w_pupil, 0, 1)
    w_hairlike = np.maximum(w_hair, w_brow)

    def lerp(base, color, w):
        return base * (1 - w[:, None]) + np.asarray(color)[None] * w[:, None]

    skin_c = np.array([0.80, 0.62, 0.52])
    hair_c = np.array([0.24, 0.17, 0.12])
    lip_c = np.array([0.74, 0.44, 0.44])
    mean_tex = np.tile(skin_c, (V, 1))
    mean_tex = lerp(mean_tex, hair_c, w_hair)
    mean_tex = lerp(mean_tex, hair_c * 0.8, w_brow)
    mean_tex = lerp(mean_tex, lip_c, w_lip)
    mean_tex[eyes] = np.array([0.93, 0.91, 0.88])
    mean_tex = lerp(mean_tex, [0.36, 0.26, 0.16], w_iris)
    mean_tex = lerp(mean_tex, [0.03, 0.03, 0.03], w_pupil)
    teeth = inner & np.isin(vrow, [mouth_rows[1]]) & (np.abs(X) < 0.15) & face
    mean_tex[mouth_interior] = np.array([0.30, 0.07, 0.08])
    mean_tex[teeth] = np.array([0.88, 0.85, 0.78])
    lid_margin = lids & ((np.arange(V) - o_lr) % lid_nv == lid_nv - 1)
    mean_tex[lid_margin] = skin_c * 0.55

    tex_b = np.zeros((V, 3, 80))
    skin_w = (1 - w_hair) * (1 - w_brow) * (1 - w_lip) * ~eyes * ~mouth_interior
    rng = np.random.default_rng(1234)
    cols = []
    for ch in range(3):
        cols.append(0.1 * (skin_w + 0.7 * w_lip)[:, None] * np.eye(3)[ch])
    for ch in range(3):
        cols.append(0.1 * w_hairlike[:, None] * np.eye(3)[ch])
    for ch in range(3):
        cols.append(0.1 * w_iris_only[:, None] * np.eye(3)[ch])
    for ch in range(3):
        cols.append(0.1 * w_lip[:, None] * np.eye(3)[ch])
    blush = sum(_gauss(X, Y, s * 0.42, -0.05, 0.14, 0.12) for s in (-1, 1)) * frontness * skin_w
    cols.append(blush[:, None] * np.array([0.08, -0.03, -0.02]))
    cols.append(skin_w[:, None] * np.array([-0.05, -0.07, -0.09]))
    cols.append(w_brow[:, None] * np.array([-0.1, -0.1, -0.1]))

    def noise_field(freq, n_waves, seed_rng, aniso=(1.0, 1.0, 1.0)):
        d = seed_rng.normal(size=(n_waves, 3)) * np.asarray(aniso)
        d *= freq / np.linalg.norm(d, axis=1, keepdims=True)
        ph = seed_rng.uniform(0, 2 * math.pi, n_waves)
        f = np.cos(verts @ d.T + ph).sum(1) / math.sqrt(n_waves)
        return f

    for i in range(20):  # skin detail: blotches and freckle-like spots at several scales
        freq = [6, 10, 16, 24, 34][i % 5]
        f = noise_field(freq, 12, rng)
        if i % 5 >= 3:
            f = np.clip(f - 1.0, 0, None) * 2.0  # sparse spots
        cols.append((0.015 * f * skin_w)[:, None] * np.array([1.0, 0.85, 0.75]))
    for i in range(10):  # hair streaks: high frequency across, low along the strands
        f = noise_field([20, 35, 50][i % 3], 16, rng, aniso=(1.0, 0.25, 1.0))
        cols.append((0.04 * f * w_hairlike)[:, None] * np.ones(3))
    for i in range(4):
        ang = np.arctan2(Y - EYE_C[1], np.abs(X) - EYE_C[0])
        f = np.cos((8 + 5 * i) * ang + rng.uniform(0, 6.28))
        cols.append((0.05 * f * w_iris_only)[:, None] * np.ones(3))
    assert len(cols) == len(TEX_NAMES), (len(cols), len(TEX_NAMES))
    for i, c in enumerate(cols):
        tex_b[:, :, i] = c

    # landmarks
    lm = _landmarks(verts, comp, vrow, mouth_rows, o_lr, o_ll, lid_nv, frontness)
    return HeadParts(verts=verts, faces=faces, id_basis=id_b, exp_basis=exp_b, mean_tex=mean_tex,
                     tex_basis=tex_b, landmarks=lm, regions=regions, id_names=list(ID_NAMES),
                     exp_names=list(EXP_NAMES), tex_names=list(TEX_NAMES), mirror=mirror)


def _landmarks(verts, comp, vrow, mouth_rows, o_lr, o_ll, lid_nv, frontness):
    """The 68 iBUG landmark vertex indices (0 = the subject's right jaw end, image left)."""
    X, Y = verts[:, 0], verts[:, 1]
    sheet = (comp == 0) & ~np.isin(vrow, mouth_rows) & (frontness > 0.5)

    def nearest(cands, x, y):
        idx = np.nonzero(cands)[0]
        return int(idx[np.argmin((X[idx] - x) ** 2 + (Y[idx] - y) ** 2)])

    lm = []
    for k in range(17):  # jaw: from the right ear down round the chin to the left ear
        b = math.pi * k / 16
        x = -0.70 * math.cos(b)
        y = 0.12 - 1.05 * math.sin(b) if 3 <= k <= 13 else 0.12 - 1.0 * math.sin(b)
        lm.append(nearest(sheet, x, y))
    for k in range(5):   # right brow (outer -> inner), then left brow (inner -> outer)
        x = -0.55 + 0.105 * k
        lm.append(nearest(sheet, x, BROW_Y + 0.05 * (1 - ((abs(x) - 0.32) / 0.23) ** 2)))
    for k in range(5):
        x = 0.13 + 0.105 * k
        lm.append(nearest(sheet, x, BROW_Y + 0.05 * (1 - ((abs(x) - 0.32) / 0.23) ** 2)))
    for y in (0.42, 0.30, 0.17, 0.03):  # nose bridge to tip
        lm.append(nearest(sheet, 0.0, y))
    for x, y in ((-0.12, -0.11), (-0.06, -0.13), (0.0, -0.14), (0.06, -0.13), (0.12, -0.11)):
        lm.append(nearest(sheet, x, y))
    lid_margin = np.zeros(len(X), bool)
    lid_margin[o_lr:] = (np.arange(len(X) - o_lr) % lid_nv) == lid_nv - 1
    lower_eye = lambda sgn, x: EYE_C[1] - EYE_R[1] * math.sqrt(max(0, 1 - ((x - sgn * EYE_C[0]) / EYE_R[0]) ** 2))
    for sgn, order in ((-1, (-1.0, -0.4, 0.4, 1.0)), (1, (-1.0, -0.4, 0.4, 1.0))):
        cx = sgn * EYE_C[0]
        xs = [cx + o * EYE_R[0] for o in order]
        if sgn < 0:   # right eye: 36 outer corner (image left) ... 39 inner corner
            pts = [nearest(sheet, xs[0] - 0.01, EYE_C[1])]
            pts += [nearest(lid_margin & (X < 0), xs[1], 1.0), nearest(lid_margin & (X < 0), xs[2], 1.0)]
            pts += [nearest(sheet, xs[3] + 0.01, EYE_C[1])]
            pts += [nearest(sheet, xs[2], lower_eye(sgn, xs[2])), nearest(sheet, xs[1], lower_eye(sgn, xs[1]))]
        else:         # left eye: 42 inner corner ... 45 outer corner
            pts = [nearest(sheet, xs[0] - 0.01, EYE_C[1])]
            pts += [nearest(lid_margin & (X > 0), xs[1], 1.0), nearest(lid_margin & (X > 0), xs[2], 1.0)]
            pts += [nearest(sheet, xs[3] + 0.01, EYE_C[1])]
            pts += [nearest(sheet, xs[2], lower_eye(sgn, xs[2])), nearest(sheet, xs[1], lower_eye(sgn, xs[1]))]
        lm += pts
    on_front = frontness > 0.5
    upper_row = np.isin(vrow, [mouth_rows[0]]) & on_front
    u_in = np.isin(vrow, [mouth_rows[1]]) & on_front
    l_in = np.isin(vrow, [mouth_rows[2]]) & on_front
    lm.append(nearest(upper_row, -MOUTH_HW, MOUTH_Y))                     # 48
    for x, y in ((-0.17, -0.37), (-0.07, -0.335), (0.0, -0.34), (0.07, -0.335), (0.17, -0.37)):
        lm.append(nearest(sheet, x, y))                                   # 49-53
    lm.append(nearest(upper_row, MOUTH_HW, MOUTH_Y))                      # 54
    for x, y in ((0.17, -0.50), (0.07, -0.53), (0.0, -0.535), (-0.07, -0.53), (-0.17, -0.50)):
        lm.append(nearest(sheet, x, y))                                   # 55-59
    lm.append(nearest(u_in, -0.21, MOUTH_Y))                              # 60
    for x in (-0.1, 0.0, 0.1):
        lm.append(nearest(u_in, x, MOUTH_Y))                              # 61-63
    lm.append(nearest(u_in, 0.21, MOUTH_Y))                               # 64
    for x in (0.1, 0.0, -0.1):
        lm.append(nearest(l_in, x, MOUTH_Y))                              # 65-67
    return np.asarray(lm, dtype=np.int64)
