"""Landmark-based 3DMM fit of whole videos: identity shared per video, expression and pose per
frame, with a temporal smoothness prior; vectorised over frames.

Unknowns: ``id (80,)`` shared, ``exp (T, 64)``, ``angles (T, 3)``, ``trans (T, 3)``. The 68 model
landmarks are projected with the EG3D camera of the pose (:func:`pyface.face.cameras.
deep3d_to_label`, fixed FFHQ intrinsics), exactly as :meth:`MorphableModel.render` draws them, so
the fitted coefficients and their labels are consistent with the image the landmarks come from.
Only the 68 landmark rows of the bases are evaluated; :func:`fit_landmarks` leaves texture and
lighting at zero. The objective is a negative log posterior in the model's own units
(:class:`FitConfig`), with the landmark noise level estimated from the data.

:func:`fit_appearance` then solves albedo (shared) and SH lighting (per frame) for a fixed
geometry, and :func:`fit_photometric` refines geometry and pose against the image itself
(landmark term plus the colours of the image sampled at the projected skin vertices).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pyface.face import cameras as cam
from pyface.face.coeffs import merge_coeffs

#: Default per-landmark weights, read as inverse variance factors of the landmark noise (point
#: k has standard deviation ``sigma / sqrt(w_k)``): the jaw contour and the nose carry less
#: weight (their meaning differs most between landmark detectors and head models).
GROUP_WEIGHTS = {"jaw": 0.2, "brows": 1.0, "nose": 0.5, "eyes": 1.0, "mouth": 1.0}
_GROUPS = {"jaw": range(0, 17), "brows": range(17, 27), "nose": range(27, 36),
           "eyes": range(36, 48), "mouth": range(48, 68)}


@dataclass
class FitConfig:
    """Settings of :func:`fit_landmarks`, a maximum a posteriori fit.

    The negative log posterior is ``sum_t,k w_k |p_tk - q_tk|^2 / (2 sigma^2)`` (landmark noise
    ``sigma`` pixels at 256^2, scaled with the image) plus the Gaussian priors of the model in its
    own units: ``|id / id_std|^2 / 2`` once per video and ``|exp / exp_std|^2 / 2`` per frame (the
    built-in head and Deep3DFaceRecon's BFM both scale their bases so that a coefficient of 1 is
    one standard deviation, or for the built-in expressions the full extent), plus a random walk
    on expression, angles and translation between consecutive frames with per-frame standard
    deviations ``smooth_exp``, ``smooth_angle`` (radians) and ``smooth_trans`` (BFM units,
    1 = 10 cm). With ``sigma = None`` the noise level is estimated from the data: a first joint
    fit at ``sigma_init`` px, then ``sigma`` is set to the weighted RMS residual of that fit
    (floored at ``sigma_min`` px) and the fit continues (empirical Bayes): exact landmarks give
    a small ``sigma`` and the priors barely act; noisy detections a larger one.
    """

    steps: int = 100            # L-BFGS iterations of the first joint stage (pose stage: a fifth,
    #                             the stage at the estimated sigma: twice as many)
    sigma: float | None = None  # landmark noise in px at 256^2 (None: estimated from the data)
    sigma_init: float = 2.0     # px at 256^2, the first stage of the estimate
    sigma_min: float = 0.25     # px at 256^2, floor of the estimate
    id_std: float = 1.0         # factor on the model's identity standard deviations (model_id_std)
    exp_std: float = 1.0        # expression prior, in the model's coefficient units
    smooth_exp: float = 0.3     # per-frame random walk of the expression coefficients
    smooth_angle: float = 0.05  # per-frame random walk of the angles, radians (about 3 deg)
    smooth_trans: float = 0.05  # per-frame random walk of the translation, BFM units (5 mm)
    device: str = "cpu"


@dataclass
class FitResult:
    """``coeffs (T, 257)``, ``labels (T, 25)``, ``residual (T,)`` mean point error in pixels,
    ``landmarks (T, K, 2)`` the fitted model's points in pixels, ``sigma`` the landmark noise
    (px at 256^2) the final stage used; ``appearance`` the final albedo/lighting solve of
    :func:`fit_photometric` (None from :func:`fit_landmarks`)."""

    coeffs: torch.Tensor
    labels: torch.Tensor
    residual: torch.Tensor
    landmarks: torch.Tensor
    sigma: float = float("nan")
    appearance: "AppearanceResult | None" = None


def model_id_std(model) -> torch.Tensor:
    """The standard deviation ``(80,)`` of each identity coefficient in the model's prior:
    ``model.id_std`` where the model has one (the built-in head:
    :data:`pyface.face.procedural.ID_STD`), else ones (Deep3DFaceRecon's BFM bases are scaled
    by their PCA standard deviations)."""
    std = getattr(model, "id_std", None)
    n = model.id_basis.shape[1]
    if std is None:
        return torch.ones(n)
    std = torch.as_tensor(std, dtype=torch.float32)
    if tuple(std.shape) != (n,):
        raise ValueError(f"model.id_std: expected shape ({n},), got {tuple(std.shape)}")
    return std


def landmark_weights() -> torch.Tensor:
    w = torch.ones(68)
    for g, idx in _GROUPS.items():
        w[list(idx)] = GROUP_WEIGHTS[g]
    return w


def project_pose(points: torch.Tensor, angles: torch.Tensor, trans: torch.Tensor,
                 focal: float = cam.FFHQ_FOCAL) -> torch.Tensor:
    """Normalised image coordinates ``uv (T, N, 2)`` (0..1, origin top-left) of head-frame
    ``points: (T, N, 3)`` (model units) posed by Deep3DFaceRecon ``angles (T, 3)`` and
    ``trans (T, 3)``: the same as ``cam.project_label(points * cam.BFM_TO_EG3D_SCALE,
    cam.deep3d_to_label(angles, trans))`` (what :meth:`MorphableModel.render` draws) in closed
    form, without building and inverting the camera matrix (the EG3D scale cancels): the camera
    sits at ``(0, 0, BFM_CAMERA_DISTANCE)`` looking down -z at ``R p + t``."""
    return _project_xyz(*points.unbind(-1), angles, trans, focal)


def _project_xyz(x, y, z, angles, trans, focal: float = cam.FFHQ_FOCAL) -> torch.Tensor:
    """:func:`project_pose` of the coordinates ``x, y, z: (T, N)`` each: ``(T, N, 2)``. Written
    out per coordinate: a batched ``(N, 3) @ (3, 3)`` product is far slower on CPU."""
    r = cam.euler_to_rotation(angles)[..., None]                          # (T, 3, 3, 1)
    t = trans[..., None]                                                  # (T, 3, 1)
    px = r[:, 0, 0] * x + r[:, 0, 1] * y + r[:, 0, 2] * z + t[:, 0]
    py = r[:, 1, 0] * x + r[:, 1, 1] * y + r[:, 1, 2] * z + t[:, 1]
    pz = r[:, 2, 0] * x + r[:, 2, 1] * y + r[:, 2, 2] * z + t[:, 2]
    inv_z = focal / (cam.BFM_CAMERA_DISTANCE - pz)
    return torch.stack([px * inv_z, -py * inv_z], -1) + 0.5


def _stacked_basis(model, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows of ``index: (K,)`` vertices, coordinate-major (x of every vertex, then y, then
    z): mean ``(3K,)``, identity basis ``(n_id, 3K)`` and expression basis ``(n_exp, 3K)``."""
    v = model.num_vertices
    rows = lambda b: b.view(v, 3, -1)[index].permute(2, 1, 0).reshape(b.shape[-1], -1).contiguous()
    return (model.mean_shape[index].T.reshape(-1).contiguous(), rows(model.id_basis),
            rows(model.exp_basis))


def _posed_points(basis, id_c, exp) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Head-frame ``x, y, z (T, K)`` of :func:`_stacked_basis` ``basis`` for ``id_c (n_id,)``
    shared and ``exp (T, n_exp)`` per frame (the identity's part is computed once)."""
    mean, id_b, exp_b = basis
    shape = torch.addmv(mean, id_b.T, id_c)                              # (3K,)
    return torch.addmm(shape, exp, exp_b).view(exp.shape[0], 3, -1).unbind(1)


def project_landmarks(model, id_c, exp, angles, trans, image_size: int,
                      landmark_index: torch.Tensor | None = None) -> torch.Tensor:
    """Model landmarks ``(T, K, 2)`` in pixels of ``image_size`` for ``id_c: (80,)`` and per
    frame ``exp (T, 64)``, ``angles (T, 3)``, ``trans (T, 3)``; ``landmark_index: (K,)`` vertex
    indices (default ``model.landmarks``)."""
    lm = model.landmarks if landmark_index is None else landmark_index.to(model.landmarks)
    return _project_xyz(*_posed_points(_stacked_basis(model, lm), id_c, exp), angles, trans) * image_size


def lbfgs_minimise(params: list, objective, iters: int) -> None:
    """Minimises ``objective()`` (a scalar tensor) over ``params`` in place with at most ``iters``
    L-BFGS iterations (strong Wolfe line search; tolerances tight enough that ``iters`` decides)."""
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=iters, history_size=20,
                            tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = objective()
        loss.backward()
        return loss
    opt.step(closure)


def fit_landmarks(model, landmarks: torch.Tensor, image_size: int, *, weights=None,
                  segments: torch.Tensor | None = None, config: FitConfig | None = None,
                  landmark_index: torch.Tensor | None = None) -> FitResult:
    """Fits ``model`` to ``landmarks: (T, K, 2)`` (pixels of a square ``image_size`` image,
    x right, y down); K = 68 (the model's landmarks) unless ``landmark_index`` says which
    vertices the K points are.

    Args:
        weights: optional ``(K,)`` per-point weights (default :func:`landmark_weights` for 68
            points, else ones).
        segments: optional ``(T,)`` int ids; the smoothness prior links consecutive frames of the
            same segment only (frames left out between them break the chain).
        landmark_index: optional ``(K,)`` model vertices the points correspond to (default
            ``model.landmarks``; a detector whose points mean other vertices brings its own).
    """
    cfg = config or FitConfig()
    if landmarks.dim() != 3 or landmarks.shape[-1] != 2:
        raise ValueError(f"landmarks: expected shape (T, K, 2), got {tuple(landmarks.shape)}")
    t, k = landmarks.shape[:2]
    if landmark_index is None and k != 68:
        raise ValueError(f"landmarks: expected shape (T, 68, 2) without landmark_index, got "
                         f"{tuple(landmarks.shape)}")
    if landmark_index is not None and tuple(landmark_index.shape) != (k,):
        raise ValueError(f"landmark_index: expected shape ({k},), got {tuple(landmark_index.shape)}")
    if weights is not None and tuple(torch.as_tensor(weights).shape) != (k,):
        raise ValueError(f"weights: expected shape ({k},), got {tuple(torch.as_tensor(weights).shape)}")
    if t == 0:
        raise ValueError("landmarks: expected at least one frame, got T = 0")
    dev = torch.device(cfg.device)
    model = model.to(dev)
    target = landmarks.to(dev, torch.float32)
    if weights is None:
        weights = landmark_weights() if k == 68 else torch.ones(k)
    w = torch.as_tensor(weights).to(dev, torch.float32)
    if not bool((torch.as_tensor(cfg.id_std) > 0).all()):
        raise ValueError(f"config.id_std: expected a positive number, got {cfg.id_std}")
    for name in ("sigma_init", "sigma_min", "exp_std", "smooth_exp", "smooth_angle",
                 "smooth_trans"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"config.{name}: expected a positive number, got {getattr(cfg, name)}")
    if cfg.sigma is not None and not cfg.sigma > 0:
        raise ValueError(f"config.sigma: expected a positive number or None, got {cfg.sigma}")
    link = torch.ones(max(t - 1, 0), device=dev)
    if segments is not None:
        seg = torch.as_tensor(segments, device=dev)
        link = (seg[1:] == seg[:-1]).float()
    id_c = torch.zeros(model.id_basis.shape[1], device=dev, requires_grad=True)
    exp = torch.zeros(t, model.exp_basis.shape[1], device=dev, requires_grad=True)
    angles = torch.zeros(t, 3, device=dev, requires_grad=True)
    trans = torch.zeros(t, 3, device=dev, requires_grad=True)
    id_std = torch.as_tensor(cfg.id_std, dtype=torch.float32).to(dev) * model_id_std(model).to(dev)
    px = image_size / 256.0                                             # pixels per 256^2 pixel
    norm = float(t * w.sum())               # the objective is divided by it (scale only)

    def objective(shape_on: bool, sigma: float):
        e = exp if shape_on else exp.detach()
        i = id_c if shape_on else id_c.detach()
        proj = project_landmarks(model, i, e, angles, trans, image_size, landmark_index)
        d2 = (proj - target).pow(2).sum(-1) / (sigma * px) ** 2         # (T, K)
        loss = 0.5 * (d2 * w).sum()
        loss = loss + 0.5 * (i / id_std).pow(2).sum() + 0.5 * (e / cfg.exp_std).pow(2).sum()
        if t > 1:
            for x, s in ((e, cfg.smooth_exp), (angles, cfg.smooth_angle), (trans, cfg.smooth_trans)):
                loss = loss + 0.5 * (((x[1:] - x[:-1]) / s).pow(2).sum(-1) * link).sum()
        return loss / norm

    def run(shape_on: bool, iters: int, sigma: float):
        params = [angles, trans] + ([id_c, exp] if shape_on else [])
        lbfgs_minimise(params, lambda: objective(shape_on, sigma), iters)

    # L-BFGS (strong Wolfe line search): the pose alone first, then everything together; with
    # the noise level unknown, a first joint stage at sigma_init and a second at the estimate
    sigma = cfg.sigma_init if cfg.sigma is None else cfg.sigma
    run(False, max(cfg.steps // 5, 5), sigma)
    run(True, cfg.steps, sigma)
    if cfg.sigma is None:
        with torch.no_grad():
            proj = project_landmarks(model, id_c, exp, angles, trans, image_size, landmark_index)
            d2 = (proj - target).pow(2).sum(-1) / px ** 2
            # E|d|^2 = 2 sigma^2 / w_k for a 2D point with per-axis variance sigma^2 / w_k
            est = float(((d2 * w).sum() / (2 * t * k)).sqrt())
        sigma = max(est, cfg.sigma_min)
        run(True, 2 * cfg.steps, sigma)
    with torch.no_grad():
        proj = project_landmarks(model, id_c, exp, angles, trans, image_size, landmark_index)
        residual = (proj - target).norm(dim=-1).mean(-1)
        zeros = lambda n: torch.zeros(t, n, device=dev)
        coeffs = merge_coeffs(id_c.expand(t, -1), exp, zeros(80), angles, zeros(27), trans)
        labels = cam.deep3d_to_label(angles, trans)
    return FitResult(coeffs=coeffs.cpu(), labels=labels.cpu(), residual=residual.cpu(),
                     landmarks=proj.cpu(), sigma=sigma)


# ----------------------------------------------------------------------------------------------
# appearance: albedo (shared) and SH lighting (per frame)


@dataclass
class AppearanceResult:
    """``coeffs (T, 257)`` with ``tex`` and ``gamma`` filled in, ``residual (T,)`` RMS colour
    error (0..1 units) over the fitted pixels, ``pixels (T,)`` their count."""

    coeffs: torch.Tensor
    residual: torch.Tensor
    pixels: torch.Tensor


def _skin_vertices(model) -> torch.Tensor:
    keep = torch.ones(model.num_vertices, dtype=torch.bool)
    names = model.region_names
    if "skin" in names:
        keep = model.region("skin").clone()
    elif "face" in names:
        keep = model.region("face").clone()
    for r in ("hair", "brows", "eyes", "mouth", "lips", "mouth_interior", "eyelids"):
        if r in names:
            keep &= ~model.region(r)
    return keep


def _skin_pixels(model, coeffs, images, max_pixels, valid=None):
    """Rasterizes ``coeffs: (T, 257)`` once and gathers up to about ``max_pixels`` evenly spread
    skin pixels per frame (inside ``valid: (T, 1, H, W)`` where given): frame index ``(P,)``,
    triangle vertices ``(P, 3)``, barycentrics ``(P, 3)``, target colours ``(P, 3)`` and the
    vertices' SH basis ``(P, 3, 9)``."""
    from pyface.face.coeffs import split_coeffs
    from pyface.face.morphable import sh_basis, vertex_normals
    from pyface.face.render import render_mesh

    t = coeffs.shape[0]
    h, w = images.shape[-2:]
    c = split_coeffs(coeffs)
    verts = model.shape(c["id"], c["exp"])                                       # (T, V, 3)
    label = model.label_of(coeffs)
    c2w, _ = cam.split_label(label)
    rot = (c2w[:, :3, :3] @ torch.diag(c2w.new_tensor([1.0, -1.0, -1.0]))).transpose(1, 2)
    uv, z = cam.project_label(verts * cam.BFM_TO_EG3D_SCALE, label)
    ras = render_mesh(torch.cat([uv * 2 - 1, z], -1), model.faces, (h, w), None, cull=model.cull)
    skin = _skin_vertices(model).to(verts.device)
    fidx = ras.face_index                                                         # (T, H, W)
    tri = model.faces[fidx.clamp_min(0)]                                           # (T, H, W, 3)
    ok = (fidx >= 0) & skin[tri].all(-1)
    if valid is not None:
        ok &= valid[:, 0] > 0.5
    tt, yy, xx = ok.nonzero(as_tuple=True)
    step = max(1, -(-len(tt) // (max_pixels * t)))
    tt, yy, xx = tt[::step], yy[::step], xx[::step]
    tri, bary = tri[tt, yy, xx], ras.bary[tt, yy, xx]
    target = images.float()[tt, :, yy, xx]
    normals = vertex_normals(verts, model.faces) @ rot.transpose(1, 2)
    ysh = sh_basis(normals)[tt[:, None], tri]                                      # (P, 3, 9)
    return tt, tri, bary, target, ysh


def _solve_gamma(a, target, tt, t, w_gamma, init_light):
    """Per frame and colour, the ridge solution of ``a (P, 3ch, 9) . g = target (P, 3)``."""
    g = torch.zeros(t, 3, 9)
    g[:, :, 0] = init_light
    prior = torch.zeros(9)
    prior[0] = init_light
    eye9 = torch.eye(9)
    for f in range(t):
        sel = tt == f
        n = int(sel.sum())
        if n < 20:
            continue
        for ch in range(3):
            A, y = a[sel, ch], target[sel, ch]
            g[f, ch] = torch.linalg.solve(A.T @ A + w_gamma * n * eye9,
                                          A.T @ y + w_gamma * n * prior)
    return g


def fit_appearance(model, coeffs: torch.Tensor, images: torch.Tensor, *, iters: int = 3,
                   w_tex: float = 1e-3, w_gamma: float = 1e-3, max_pixels: int = 600,
                   albedo_frames: int = 32, chunk: int = 64,
                   valid: torch.Tensor | None = None) -> AppearanceResult:
    """Albedo ``tex`` (shared by the frames) and SH lighting ``gamma`` (per frame) of the
    geometry in ``coeffs: (T, 257)`` (id, exp, angles, trans as fitted) from ``images:
    (T, 3, H, W)`` in [0, 1], seen by the camera of the coefficients (:meth:`MorphableModel.
    render`'s).

    The mesh is rasterized once (skin pixels; hair, brows, eyes and mouth left out); a pixel's
    colour, ``sum_i b_i albedo_i * (SH(n_i) . gamma)``, is linear in ``gamma`` for a fixed albedo
    and linear in ``tex`` for fixed lighting. The albedo comes from up to ``albedo_frames``
    evenly spread frames, alternating the two ridge least-squares solves ``iters`` times from
    ``tex = 0``; then every frame's lighting is solved with that albedo, ``chunk`` frames at a
    time (memory does not grow with T). At most about ``max_pixels`` evenly spread pixels per
    frame enter the solves. Clamping of the renderer is ignored. Albedo and lighting share an
    overall scale that the images cannot separate: the priors (``w_tex``, ``w_gamma``, towards
    the mean albedo and Deep3DFaceRecon's ambient 0.8) pick it. ``valid: (T, 1, H, W)``
    (optional, > 0.5 = usable) leaves out pixels that are not image content, e.g. the repeated
    edge of a crop that leaves the source frame.
    """
    from pyface.face.morphable import INIT_LIGHT

    if coeffs.dim() != 2 or coeffs.shape[1] != 257:
        raise ValueError(f"coeffs: expected shape (T, 257), got {tuple(coeffs.shape)}")
    t = coeffs.shape[0]
    if images.dim() != 4 or images.shape[:2] != (t, 3):
        raise ValueError(f"images: expected shape ({t}, 3, H, W), got {tuple(images.shape)}")
    if valid is not None and tuple(valid.shape) != (t, 1, *images.shape[2:]):
        raise ValueError(f"valid: expected shape ({t}, 1, {images.shape[2]}, {images.shape[3]}), "
                         f"got {tuple(valid.shape)}")
    coeffs = coeffs.float()
    v = model.num_vertices
    with torch.no_grad():
        # albedo from a subset of frames
        sub = torch.linspace(0, t - 1, min(t, albedo_frames)).round().long().unique()
        pixels = _skin_pixels(model, coeffs[sub], images[sub], max_pixels,
                              None if valid is None else valid[sub])
        tt, tri, bary, target, ysh = pixels
        every = len(sub) == t and t <= chunk    # the same pixels serve the lighting solve below
        mean_p = model.mean_tex[tri]                                               # (P, 3v, 3ch)
        basis = model.tex_basis.view(v, 3, -1)[tri]                                # (P, 3, 3, 80)
        tex = torch.zeros(basis.shape[-1])
        eye = torch.eye(basis.shape[-1])
        for _ in range(max(1, iters)):
            alb = mean_p + basis @ tex
            a = torch.einsum("pi,pic,pik->pck", bary, alb, ysh)
            g = _solve_gamma(a, target, tt, len(sub), w_gamma, INIT_LIGHT)
            s = torch.einsum("pik,pck->pic", ysh, g[tt])                           # (P, 3v, 3ch)
            A = torch.einsum("pi,pic,picj->pcj", bary, s, basis).reshape(-1, basis.shape[-1])
            y = (target - torch.einsum("pi,pic,pic->pc", bary, s, mean_p)).reshape(-1)
            tex = torch.linalg.solve(A.T @ A + w_tex * len(y) * eye, A.T @ y)
        albedo = model.mean_tex + (model.tex_basis @ tex).view(v, 3)               # (V, 3)
        # lighting of every frame, chunk by chunk
        gamma = torch.zeros(t, 3, 9)
        residual, count = torch.zeros(t), torch.zeros(t)
        for s0 in range(0, t, chunk):
            sl = slice(s0, min(t, s0 + chunk))
            n = sl.stop - sl.start
            tt, tri, bary, target, ysh = pixels if every else _skin_pixels(
                model, coeffs[sl], images[sl], max_pixels, None if valid is None else valid[sl])
            a = torch.einsum("pi,pic,pik->pck", bary, albedo[tri], ysh)
            g = _solve_gamma(a, target, tt, n, w_gamma, INIT_LIGHT)
            pred = torch.einsum("pck,pck->pc", a, g[tt])
            err = (pred - target).pow(2).mean(-1)
            cnt = torch.bincount(tt, minlength=n).float()
            residual[sl] = (torch.zeros(n).index_add(0, tt, err) / cnt.clamp_min(1)).sqrt()
            count[sl] = cnt
            gamma[sl] = g
        gamma[:, :, 0] -= INIT_LIGHT
        out = coeffs.clone()
        out[:, 144:224] = tex
        out[:, 227:254] = gamma.reshape(t, 27)
    return AppearanceResult(coeffs=out, residual=residual, pixels=count)


# ----------------------------------------------------------------------------------------------
# photometric refinement of the geometry and pose


@dataclass
class PhotometricConfig:
    """Settings of :func:`fit_photometric`.

    ``rounds`` alternations of the albedo/lighting solve (:func:`fit_appearance`) and an L-BFGS
    run of ``steps`` iterations on the geometry (identity, expression, angles, translation);
    ``sigma_color`` the colour noise (0..1 units, per channel) of one vertex sample, i.e. the
    weight of the photometric term against the landmark term (0.1: chosen on three quality sets
    and confirmed on two fresh ones, docs/data.md; 0.07 before); ``min_facing`` the smallest
    camera-facing component of a vertex normal that is sampled (grazing vertices near the
    outline are left out: their colour changes with occlusion, not with the pose);
    ``max_vertices`` how many skin vertices (evenly strided over the model's vertex order) are
    sampled at most (a subsample is weighted as all skin vertices; fewer lose accuracy: on a
    24-frame rendered clip 4000 of the 11 290 took the pitch error from 0.2 to 0.9 deg); ``expression``: whether the expression is refined too (False: it stays
    as the landmark fit has it)."""

    rounds: int = 4
    steps: int = 120
    sigma_color: float = 0.1
    min_facing: float = 0.2
    max_vertices: int = 100000
    expression: bool = True


def _visible_skin(model, coeffs, size: int, min_facing: float, max_vertices: int = 100000):
    """Per frame, which skin vertices (:func:`_skin_vertices`) are visible at ``size^2`` and
    face the camera, and their predicted colours: ``mask (T, K)`` bool, ``colors (T, K, 3)``
    (albedo x SH shading of ``coeffs: (T, 257)``, clamped to [0, 1]) and ``index (K,)``."""
    from pyface.face.coeffs import split_coeffs
    from pyface.face.morphable import INIT_LIGHT, sh_basis, vertex_normals
    from pyface.face.render import render_mesh

    t = coeffs.shape[0]
    c = split_coeffs(coeffs)
    verts = model.shape(c["id"], c["exp"])                                       # (T, V, 3)
    label = model.label_of(coeffs)
    c2w, _ = cam.split_label(label)
    rot = (c2w[:, :3, :3] @ torch.diag(c2w.new_tensor([1.0, -1.0, -1.0]))).transpose(1, 2)
    normals = vertex_normals(verts, model.faces) @ rot.transpose(1, 2)          # camera frame
    g = c["gamma"].reshape(t, 3, 9).clone()
    g[:, :, 0] = g[:, :, 0] + INIT_LIGHT
    colors = (model.albedo(c["tex"]).clamp(0, 1) * (sh_basis(normals) @ g.transpose(1, 2))).clamp(0, 1)
    uv, z = cam.project_label(verts * cam.BFM_TO_EG3D_SCALE, label)
    ras = render_mesh(torch.cat([uv * 2 - 1, z], -1), model.faces, (size, size), None, cull=model.cull)
    visible = torch.zeros(t, model.num_vertices, dtype=torch.bool)
    for f in range(t):
        drawn = ras.face_index[f].unique()
        visible[f, model.faces[drawn[drawn >= 0]].reshape(-1)] = True
    index = _skin_vertices(model).nonzero()[:, 0]
    index = index[::max(1, -(-len(index) // max_vertices))]
    mask = (visible & (normals[..., 2] > min_facing))[:, index]
    return mask, colors[:, index], index


def fit_photometric(model, coeffs: torch.Tensor, images: torch.Tensor, landmarks: torch.Tensor,
                    image_size: int, *, sigma: float, weights=None,
                    segments: torch.Tensor | None = None,
                    landmark_index: torch.Tensor | None = None, config: FitConfig | None = None,
                    photometric: PhotometricConfig | None = None,
                    valid: torch.Tensor | None = None) -> FitResult:
    """Refines a landmark fit (:func:`fit_landmarks`) with the image: identity, expression and
    pose under the landmark term of :func:`fit_landmarks` (at the noise level ``sigma`` px at
    256^2, e.g. its ``FitResult.sigma``) plus a photometric term, the colour of the image at the
    projection of every visible skin vertex against the vertex's predicted colour (albedo x SH
    lighting), as in analysis-by-synthesis 3DMM fitting. The image is sampled bilinearly at the
    projected vertices, so the term is differentiable in the geometry and pose (the rasterizer
    gives no vertex gradients: visibility and the predicted colours are held fixed within a
    round). Each round first solves albedo and lighting for the current geometry
    (:func:`fit_appearance`); the returned coefficients carry the albedo and lighting of a final
    solve. Landmarks alone leave the head's pitch to where the detector puts the points; the
    shading and the painted-on features fix it.

    Args:
        coeffs: ``(T, 257)`` the landmark fit (id, exp, angles, trans; tex and gamma ignored).
        images: ``(T, 3, S, S)`` in [0, 1], the crops the landmarks are in (any ``S``; e.g. 64).
        landmarks: ``(T, K, 2)`` pixels of the square ``image_size`` crop, as for
            :func:`fit_landmarks` (``landmark_index``, ``weights``, ``segments`` likewise).
        sigma: landmark noise in px at 256^2 (positive).
        valid: optional ``(T, 1, S, S)``, > 0.5 where ``images`` show the source (a crop that
            leaves the frame repeats its edge there): vertices projecting elsewhere are not
            sampled, and the albedo/lighting solves skip those pixels.
    """
    cfg = config or FitConfig()
    pc = photometric or PhotometricConfig()
    if coeffs.dim() != 2 or coeffs.shape[1] != 257:
        raise ValueError(f"coeffs: expected shape (T, 257), got {tuple(coeffs.shape)}")
    t = coeffs.shape[0]
    if images.dim() != 4 or images.shape[:2] != (t, 3) or images.shape[2] != images.shape[3]:
        raise ValueError(f"images: expected shape ({t}, 3, S, S), got {tuple(images.shape)}")
    if landmarks.dim() != 3 or landmarks.shape[0] != t or landmarks.shape[-1] != 2:
        raise ValueError(f"landmarks: expected shape ({t}, K, 2), got {tuple(landmarks.shape)}")
    k = landmarks.shape[1]
    if landmark_index is None and k != 68:
        raise ValueError(f"landmarks: expected shape ({t}, 68, 2) without landmark_index, got "
                         f"{tuple(landmarks.shape)}")
    if not sigma > 0:
        raise ValueError(f"sigma: expected a positive number, got {sigma}")
    if valid is not None and tuple(valid.shape) != (t, 1, *images.shape[2:]):
        raise ValueError(f"valid: expected shape ({t}, 1, {images.shape[2]}, {images.shape[3]}), "
                         f"got {tuple(valid.shape)}")
    for name in ("rounds", "steps", "sigma_color", "max_vertices"):
        if not getattr(pc, name) > 0:
            raise ValueError(f"photometric.{name}: expected a positive number, got {getattr(pc, name)}")
    import torch.nn.functional as F

    from pyface.face.coeffs import split_coeffs

    size = images.shape[-1]
    images = images.float()
    target = landmarks.float()
    w = (landmark_weights() if k == 68 else torch.ones(k)) if weights is None else \
        torch.as_tensor(weights, dtype=torch.float32)
    link = torch.ones(max(t - 1, 0))
    if segments is not None:
        seg = torch.as_tensor(segments)
        link = (seg[1:] == seg[:-1]).float()
    c = split_coeffs(coeffs.float())
    id_c = c["id"][0].clone().requires_grad_(True)
    exp = c["exp"].clone().requires_grad_(True)
    angles = c["angles"].clone().requires_grad_(True)
    trans = c["trans"].clone().requires_grad_(True)
    id_std = torch.as_tensor(cfg.id_std, dtype=torch.float32) * model_id_std(model)
    s2 = (sigma * image_size / 256.0) ** 2
    norm = float(t * w.sum())
    cur = coeffs.float()
    lm_basis = _stacked_basis(model, model.landmarks if landmark_index is None
                              else landmark_index.to(model.landmarks))
    n_skin = int(_skin_vertices(model).sum())
    for _ in range(pc.rounds):
        with torch.no_grad():
            cur = fit_appearance(model, cur, images, valid=valid).coeffs
            mask, colors, index = _visible_skin(model, cur, size, pc.min_facing, pc.max_vertices)
            mask = mask.float()
            if valid is not None:           # where the vertices project now, inside the source
                uv, _ = cam.project_label(model.shape(cur[:, :80], cur[:, 80:144])[:, index]
                                          * cam.BFM_TO_EG3D_SCALE, model.label_of(cur))
                mask = mask * (F.grid_sample(valid.float(), (uv * 2 - 1)[:, :, None, :],
                                             align_corners=False)[:, 0, :, 0] > 0.5).float()
        # per-sample weight; a subsample of the skin vertices stands for all of them
        weight = 0.5 * n_skin / len(index) / pc.sigma_color ** 2
        seen_any = mask.any(0) if mask.dtype == torch.bool else mask.amax(0) > 0
        index, mask, colors = index[seen_any], mask[:, seen_any], colors[:, seen_any]
        # only vertices sampled in some frame enter the objective (about half of the skin)
        basis = _stacked_basis(model, index)
        wmask = (mask * weight)[:, None]                                         # (T, 1, K')
        colors = colors.transpose(1, 2).contiguous()                             # (T, 3, K')

        def objective():
            uv = _project_xyz(*_posed_points(basis, id_c, exp), angles, trans)
            seen = F.grid_sample(images, (uv * 2 - 1)[:, :, None, :], mode="bilinear",
                                 padding_mode="border", align_corners=False)[..., 0]   # (T, 3, K')
            loss = ((seen - colors).pow(2) * wmask).sum()
            proj = _project_xyz(*_posed_points(lm_basis, id_c, exp), angles, trans) * image_size
            loss = loss + 0.5 * ((proj - target).pow(2).sum(-1) * w).sum() / s2
            loss = loss + 0.5 * (id_c / id_std).pow(2).sum() + 0.5 * (exp / cfg.exp_std).pow(2).sum()
            if t > 1:
                for x, s in ((exp, cfg.smooth_exp), (angles, cfg.smooth_angle), (trans, cfg.smooth_trans)):
                    loss = loss + 0.5 * (((x[1:] - x[:-1]) / s).pow(2).sum(-1) * link).sum()
            return loss / norm

        params = [angles, trans, id_c] + ([exp] if pc.expression else [])
        lbfgs_minimise(params, objective, pc.steps)
        with torch.no_grad():
            cur = merge_coeffs(id_c.detach().expand(t, -1), exp.detach(), cur[:, 144:224],
                               angles.detach(), cur[:, 227:254], trans.detach())
    with torch.no_grad():
        app = fit_appearance(model, cur, images, valid=valid)
        proj = project_landmarks(model, id_c, exp, angles, trans, image_size, landmark_index)
        residual = (proj - target).norm(dim=-1).mean(-1)
        labels = cam.deep3d_to_label(angles, trans)
    return FitResult(coeffs=app.coeffs, labels=labels.detach(), residual=residual,
                     landmarks=proj.detach(), sigma=sigma, appearance=app)
