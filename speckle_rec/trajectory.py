"""Trajectory of a freehand scan from its frames: pair measurements → signs → bundle adjustment.

Conventions (contract §3): image-mm coordinates; a pair ``(i, j)`` measures ``T_{i←j}``. The
outputs are ``frame_to_first`` G_i = T_{0←i} and ``frame_to_previous`` L_i = T_{i−1←i} (row i − 1
for frame i); ``L`` is derived from ``G`` (:func:`speckle_rec.transforms.locals_from_globals`).

Stages (timed in ``diagnostics["seconds"]``)
--------------------------------------------
1. **Measure.** Frames are smoothed once (the model's ``smooth_px``). In-plane motion comes from
   Lucas-Kanade flow between consecutive frames only, on frames reduced by ``flow_downsample``:
   flow degrades fast as speckle decorrelates (measured: 0.005 mm per consecutive pair, 0.1-0.2 mm
   and failures at stride 4-8), so longer pairs are compensated with the chained stride-1 motion.
   Patch correlations ρ are measured for every start frame at every stride in ``strides`` on a
   coarse patch grid (about ``patches`` patches of the model's size), by the parallel Numba
   kernel of :mod:`speckle_rec._patch_kernels`, each pair once.
2. **Key steps and signs** (:mod:`speckle_rec.direction`, which states the rule). Each key step is
   the longest stride whose median ρ stays ≥ ``key_rho``; its |plane| is fitted in ρ space
   (:func:`fit_planes`), with the skin-contact pivot prior when the data show a fixed contact;
   exact Viterbi over velocity smoothness plus two- and three-step triplet tests picks the signs.
   Then the relation across each stop (key steps several times the median length: the hand
   stopped) is set to a reversal where the key frames on its two sides meet again across it
   (:func:`_reverse_at_stops`; ``stops=False`` skips this).
   Then, on a scan that fans about a fixed skin contact (the pivot prior is on; ``slide=False``
   skips this), the relation across each quiet stretch (key steps that hardly move out of plane)
   is put to a vote of same-view key steps on its two sides by the anatomy slide
   (:mod:`speckle_rec.slide`; one sparse flow per moving key step with a same-view partner),
   then the relations at all stretches together to the same-view pairs between any two runs of
   steps they separate, and where no such pairs span a stretch, to the anatomy that frames of
   the runs on either side share where their planes cross (:mod:`speckle_rec.crossing`;
   :func:`_slide_across_quiet_stretches`). Sweeps do not come back to a view; before this gate
   the stage flipped a stretch of one wrongly (``benchmarks/README.md``).
   On a scan without a fixed contact (a sweep; ``level_sweeps=False`` skips this), the depth
   gradient of the curves' σ is fitted instead so that the sweep ends at the tilt about image x it
   started with (:func:`_level_sweep`): a translation's frames cannot tell that tilt from a depth
   bias of the curves, so without this prior the calibration decides it.
3. **Initialise.** Signed key steps are chained (:func:`_step_matrix`); frames in between take
   the chained in-plane motion and a time-proportional share of the key step's out-of-plane part.
4. **Bundle adjustment.** Poses are 6-vectors (rotation vector, mm; frame 0 = identity), solved in
   sliding windows of ``window`` frames overlapping by ``overlap`` (frames before a window fixed)
   by a robust Levenberg-Marquardt on a sparse analytic Jacobian (:func:`_levenberg_marquardt`;
   ``scipy.optimize.least_squares`` with trf/lsmr was measured at about 1 s per window).
   Residuals: the flow of every consecutive pair (centroid shift and projected rotation, whitened
   by the flow covariance), the ρ of every bright patch of every pair up to ``ba_max_stride``
   against the model at the predicted distance ``|z|`` of the patch centre from the other frame's
   plane (and the predicted tilt; soft-L1 loss; each ρ's spread is the model's at the ρ it expects
   from the window's starting poses), a weak smoothness prior (second differences of
   three points of each frame) and, with a pivot, the out-of-plane velocity of the skin contact.
5. **Mirror convention.** The result is mirrored through frame 0's plane if needed so that
   :func:`speckle_rec.direction.first_direction` equals ``first_direction``: speckle cannot tell
   a trajectory from its mirror image (see :mod:`speckle_rec.direction`).

Options (``DEFAULT_OPTIONS``) are keyword arguments of :func:`estimate_trajectory`.
"""

import copy
import math
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np
import scipy.sparse as sparse
from scipy.sparse.linalg import spsolve
from scipy.spatial.transform import Rotation

from ._patch_kernels import patch_ncc_kernel
from .crossing import band_pass, flip_gain, spread_frames
from .decorrelation import DecorrelationModel
from .direction import first_direction as _first_direction
from .direction import SignResolution, mirror, resolve_signs, reversal_gain, triplet_costs
from .errors import DataError
from .inplane import (
    check_frames,
    check_mask,
    check_spacing,
    estimate_inplane,
    fan_mask_from_frames,
    track_points,
)
from .outofplane import fan_apex_mm, fan_contact_mm, patch_grid
from .progress import progress_bar
from .slide import (
    MAX_STRETCHES,
    MAX_VIEW_MM,
    moving_steps,
    paired_steps,
    quiet_stretches,
    same_view_pairs,
    segments,
    slide_fields,
    step_travel,
    view_distances,
    view_similarity,
    vote_across_stretches,
    vote_between_segments,
)
from .threads import set_threads
from .transforms import locals_from_globals, matrices_from_params

DEFAULT_OPTIONS = {
    "strides": (1, 2, 4, 8, 16, 32),  # frame strides measured from every start frame
    "patches": 96,  # about this many patches per pair (coarse grid over the fan)
    "dark_fraction": 0.6,  # patches darker than this fraction of the pair's median hold no speckle
    "flow_downsample": None,  # LK on frames reduced by this factor (None: 2 if width >= 480 else 1)
    "flow_grid_px": None,  # LK grid spacing on the (downsampled) frames (None: 16, finer on small fans)
    "key_rho": 0.6,  # key steps: longest stride whose deep patches keep this correlation
    "triplet_weight": 0.3,  # scale of triplet costs against velocity smoothness in the sign DP
    "stops": True,  # the relation across each stop from the frames on its two sides (turn or pause)
    "slide": True,  # anatomy-slide votes across the quiet stretches of fanning scans (flows near them)
    "level_sweeps": True,  # sweeps: σ's depth gradient fitted per scan so the net tilt about image x is 0
    "pivot": "auto",  # fixed-contact prior: True, False or 'auto' (decided from the data)
    "pivot_sigma_mm": 0.05,  # allowed out-of-plane motion of the contact point per frame
    "acceleration_mm": 0.3,  # smoothness prior: σ of the anchors' second differences (mm/frame²)
    "inplane_sigma_scale": 2.0,  # flow covariances are optimistic (correlated speckle): inflate σ
    "rho_sigma_floor": 0.02,  # added to the model's ρ spread
    "f_scale": 2.0,  # soft-L1 scale of the whitened residuals
    "window": 100,  # bundle-adjustment window (frames)
    "overlap": 30,  # frames re-optimised by the next window
    "max_iterations": 5,  # Levenberg-Marquardt iterations per window
    "ba_max_stride": 4,  # longest pairs in the adjustment (longer ones: the model's bias grows)
    "first_direction": 1,  # mirror convention: +1, -1, or None (leave as solved)
}


@dataclass(frozen=True)
class TrajectoryResult:
    """Estimated transforms of a scan.

    Attributes
    ----------
    frame_to_first : (N-1, 4, 4) float64 ndarray
        G_i = T_{0←i}, image-mm, row i − 1 = frame i.
    frame_to_previous : (N-1, 4, 4) float64 ndarray
        L_i = T_{i−1←i}, derived from ``frame_to_first`` (they always agree).
    diagnostics : dict
        JSON-serialisable counts, stage timings (s), bundle-adjustment costs and sign decisions.
    """

    frame_to_first: np.ndarray
    frame_to_previous: np.ndarray
    diagnostics: dict


# --------------------------------------------------------------------------- small geometry


def _skew(v):
    """(..., 3, 3) cross-product matrices of (..., 3) vectors."""
    out = np.zeros(v.shape[:-1] + (3, 3))
    out[..., 0, 1], out[..., 0, 2] = -v[..., 2], v[..., 1]
    out[..., 1, 0], out[..., 1, 2] = v[..., 2], -v[..., 0]
    out[..., 2, 0], out[..., 2, 1] = -v[..., 1], v[..., 0]
    return out


def _left_jacobian(omega):
    """(..., 3, 3) left Jacobian of SO(3): R(ω + dω) ≈ exp([J_l(ω) dω]×) R(ω)."""
    theta = np.linalg.norm(omega, axis=-1)[..., None, None]
    k = _skew(omega)
    small = theta < 1e-6
    safe = np.where(small, 1.0, theta)
    a = np.where(small, 0.5, (1.0 - np.cos(safe)) / safe**2)
    b = np.where(small, 1.0 / 6.0, (safe - np.sin(safe)) / safe**3)
    return np.eye(3) + a * k + b * (k @ k)


def _rot2(theta):
    c, s = np.cos(theta), np.sin(theta)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def _projected_angle(rotation, moments):
    """In-plane angle a rigid 2D fit sees for points moved by ``rotation`` (..., 3, 3), projected.

    The least-squares rotation between point sets ``p`` and ``M·p`` (M the upper 2x2 block) with
    centred second moments (Sxx, Syy, Sxy) is ``atan2(N, D)`` below: what the flow measures.
    """
    sxx, syy, sxy = moments
    m = rotation[..., :2, :2]
    num = m[..., 1, 0] * sxx - m[..., 0, 1] * syy + (m[..., 1, 1] - m[..., 0, 0]) * sxy
    den = m[..., 0, 0] * sxx + m[..., 1, 1] * syy + (m[..., 0, 1] + m[..., 1, 0]) * sxy
    return np.arctan2(num, den)


def _step_matrix(inplane, plane, centroid, moments):
    """Rigid T_{i←j} (..., 4, 4) consistent with a flow measurement and a plane fit.

    The rotation maps e_z onto the plane's normal (−a, −b, 1)/‖·‖ and turns about it so the
    projected in-plane angle (:func:`_projected_angle`) equals θ; the translation puts the flow
    points' centroid where the flow saw it and the origin on the plane:
    ``t_xy = R(θ)·c + (tx, ty) − M·c`` and ``t_z = tz + a·t_x + b·t_y``.
    """
    inplane = np.asarray(inplane, dtype=np.float64)
    plane = np.asarray(plane, dtype=np.float64)
    shape = np.broadcast_shapes(inplane.shape[:-1], plane.shape[:-1])
    ip = np.broadcast_to(inplane, shape + (3,)).reshape(-1, 3)
    pl = np.broadcast_to(plane, shape + (3,)).reshape(-1, 3)
    normal = np.stack([-pl[:, 1], -pl[:, 2], np.ones(len(pl))], axis=1)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    axis = np.cross([0.0, 0.0, 1.0], normal)  # shortest rotation e_z → normal
    sin = np.linalg.norm(axis, axis=1, keepdims=True)
    angle = np.arctan2(sin[:, 0], normal[:, 2])
    align = Rotation.from_rotvec(axis / np.maximum(sin, 1e-12) * angle[:, None])
    psi = ip[:, 2].copy()
    for _ in range(3):  # the projected angle is ψ up to second order in the tilt
        rot = (align * Rotation.from_rotvec(np.outer(psi, [0.0, 0.0, 1.0]))).as_matrix()
        psi += ip[:, 2] - _projected_angle(rot, moments)
    rot = (align * Rotation.from_rotvec(np.outer(psi, [0.0, 0.0, 1.0]))).as_matrix()
    out = np.zeros((len(ip), 4, 4))
    out[:, :3, :3] = rot
    c = np.asarray(centroid, dtype=np.float64)
    t_xy = np.einsum("kij,j->ki", _rot2(ip[:, 2]), c) + ip[:, :2] - np.einsum("kij,j->ki", rot[:, :2, :2], c)
    out[:, :2, 3] = t_xy
    out[:, 2, 3] = pl[:, 0] + pl[:, 1] * t_xy[:, 0] + pl[:, 2] * t_xy[:, 1]
    out[:, 3, 3] = 1.0
    return out.reshape(shape + (4, 4))


# --------------------------------------------------------------------------- measurements


@dataclass
class _Measurements:
    """Everything measured on the scan (see stage 1 of the module docstring)."""

    stack: np.ndarray  # (N, H, W) uint8 smoothed frames
    mask: np.ndarray
    spacing: tuple
    model: DecorrelationModel
    grid: object  # PatchGrid
    beam_cos: np.ndarray  # (P,) cos / sin of the beam angle at each patch (tilt factor)
    beam_sin: np.ndarray
    inplane: np.ndarray  # (N-1, 3) (tx, ty, θ) of T_{k←k+1}
    inplane_cov: np.ndarray  # (N-1, 3, 3)
    inplane_ok: np.ndarray  # (N-1,) bool
    chain: np.ndarray  # (N, 3, 3) 2D homogeneous T2D_{0←k} from chained flow
    centroid: np.ndarray  # (2,) mm, centroid of the flow points
    moments: np.ndarray  # (3,) Sxx, Syy, Sxy of the flow points about the centroid (mm², per point)
    pairs: np.ndarray  # (M, 2) int (i, j), j > i
    rho: np.ndarray  # (M, P) float32, NaN where undefined or dark
    contact: np.ndarray  # (2,) image-mm of the skin contact (top centre of the fan)
    dark_fraction: float = 0.6

    @property
    def n_frames(self):
        return self.chain.shape[0]

    def inplane_between(self, i, j):
        """(..., 3) (tx, ty, θ) of T2D_{i←j} from the chain."""
        m = np.linalg.solve(self.chain[i], self.chain[j])
        return np.stack([m[..., 0, 2], m[..., 1, 2], np.arctan2(m[..., 1, 0], m[..., 0, 0])], axis=-1)

    def correlate(self, pairs):
        """(M, P) ρ of ``pairs`` (M, 2) after chained in-plane compensation; dark patches NaN."""
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        grid = self.grid
        rho = np.full((pairs.shape[0], len(grid)), np.nan)
        if pairs.shape[0] == 0:
            return rho
        mean = np.empty_like(rho)
        sx, sy = self.spacing
        to_mm = np.array([[sx, 0.0, sx], [0.0, sy, sy], [0.0, 0.0, 1.0]])
        to_px = np.array([[1.0 / sx, 0.0, -1.0], [0.0, 1.0 / sy, -1.0], [0.0, 0.0, 1.0]])
        # fixed pixel → fixed mm → moving mm (T2D_{j←i} = chain_j⁻¹ chain_i) → moving pixel
        moving_from_fixed = np.linalg.solve(self.chain[pairs[:, 1]], self.chain[pairs[:, 0]])
        affines = np.ascontiguousarray((to_px @ moving_from_fixed @ to_mm)[:, :2])
        patch_ncc_kernel(self.stack, np.ascontiguousarray(pairs[:, 0]), np.ascontiguousarray(pairs[:, 1]),
                         affines, self.mask, grid.rows, grid.cols, grid.height_px, grid.width_px, rho, mean)
        reference = _row_nanmedian(np.where(np.isfinite(rho), mean, np.nan), keepdims=True)
        with np.errstate(invalid="ignore"):
            dark = ~(mean >= self.dark_fraction * reference)
        rho[dark] = np.nan
        return rho


def _row_nanmedian(values, *, keepdims=False):
    """Median of each row's finite values; NaN, without NumPy's warning, for a row with none (a
    pair whose patches all fell outside the fan, as on tiny scans)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(values, axis=1, keepdims=keepdims)


def _downsample(image, factor):
    if factor == 1:
        return image
    h, w = image.shape
    return cv2.resize(image, (w // factor, h // factor), interpolation=cv2.INTER_AREA)


def _flow(stack, mask, spacing, factor, grid_px, threads, progress):
    """Stride-1 in-plane motion T_{k←k+1} for all k, with covariances, on frames reduced by ``factor``."""
    n = stack.shape[0]
    if factor > 1:
        small_mask = cv2.resize(mask.astype(np.uint8), (mask.shape[1] // factor, mask.shape[0] // factor),
                                interpolation=cv2.INTER_NEAREST)
        small_mask = cv2.erode(small_mask, np.ones((3, 3), np.uint8)) > 0
        if not small_mask.any():
            raise DataError(f"the imaged region vanishes at flow_downsample={factor}; use 1")
    else:
        small_mask = mask
    small_spacing = (spacing[0] * factor, spacing[1] * factor)
    # a reduced pixel c covers full pixels factor·c … factor·c + factor − 1: its 1-based mm
    # coordinate differs by a constant shift δ, which only changes t by (R − I)·δ
    delta = np.array([spacing[0], spacing[1]]) * (factor + 1) / 2.0 - np.array(small_spacing)
    small = [None] * n

    def reduced(k):
        if small[k] is None:
            small[k] = _downsample(stack[k], factor)
        return small[k]

    def one(k):
        return estimate_inplane(reduced(k), reduced(k + 1), mask=small_mask, spacing_mm=small_spacing,
                                grid_px=grid_px, threads=1)

    bar = progress_bar(total=n - 1, desc="flow", unit="pair", enabled=progress)
    results = [None] * (n - 1)
    chunk = 64
    with bar, ThreadPoolExecutor(max(1, threads)) as pool:
        for start in range(0, n - 1, chunk):
            stop = min(n - 1, start + chunk)
            for k in range(start, stop + 1):  # reduce serially: each frame once
                reduced(k)
            results[start:stop] = list(pool.map(one, range(start, stop)))
            for k in range(start, stop):
                small[k] = None  # keep memory flat
            bar.update(stop - start)
    set_threads(threads)  # estimate_inplane set OpenCV to one thread
    params = np.array([[m.tx_mm, m.ty_mm, m.theta_rad] for m in results])
    cov = np.array([m.covariance for m in results])
    ok = np.array([m.ok for m in results], bool)
    if ok.any():
        rot = _rot2(params[ok, 2])
        params[ok, :2] += np.einsum("kij,j->ki", rot - np.eye(2), delta)
    # failed steps: carry the neighbours' mean motion, with no weight in the adjustment
    if not ok.all():
        good = np.nonzero(ok)[0]
        for col in range(3):
            params[~ok, col] = np.interp(np.nonzero(~ok)[0], good, params[good, col]) if good.size else 0.0
        cov[~ok] = np.diag([1e6, 1e6, 1e2])
    # flow points' centroid and second moments (full-resolution mm)
    points = track_points(small_mask, grid_px=grid_px, window_px=13)
    xy = np.asarray(small_spacing) * (points + 1.0) + delta
    centroid = xy.mean(axis=0)
    d = xy - centroid
    moments = np.array([np.mean(d[:, 0] ** 2), np.mean(d[:, 1] ** 2), np.mean(d[:, 0] * d[:, 1])])
    return params, cov, ok, centroid, moments


def _measure(frames, mask, spacing, model, opts, threads, progress):
    n, h, w = frames.shape
    smooth = model.smooth_px
    stack = np.empty_like(frames)
    for k in range(n):
        if smooth > 0:
            stack[k] = cv2.GaussianBlur(frames[k], (0, 0), smooth, borderType=cv2.BORDER_REPLICATE)
        else:
            stack[k] = frames[k]
    factor = opts["flow_downsample"]
    if factor is None:
        factor = 2 if w >= 480 else 1
    grid_px = opts["flow_grid_px"]
    if grid_px is None:  # about 200 flow points at least: 16 px on a full fan, finer on small images
        grid_px = int(np.clip(np.sqrt(mask.sum() / factor**2 / 200.0), 4, 16))
    params, cov, ok, centroid, moments = _flow(stack, mask, spacing, int(factor), int(grid_px), threads,
                                               progress)
    chain = np.empty((n, 3, 3))
    chain[0] = np.eye(3)
    step = np.zeros((n - 1, 3, 3))
    step[:, :2, :2] = _rot2(params[:, 2])
    step[:, :2, 2] = params[:, :2]
    step[:, 2, 2] = 1.0
    for k in range(n - 1):
        chain[k + 1] = chain[k] @ step[k]

    area = mask.sum() * spacing[0] * spacing[1]
    pw, ph = model.patch_mm
    pitch = max(math.sqrt(area / max(int(opts["patches"]), 1)), 0.5 * min(pw, ph))
    try:
        grid = patch_grid(mask, spacing_mm=spacing, patch_mm=model.patch_mm, step_mm=(pitch, pitch))
    except DataError:
        raise DataError(f"no {pw:g} x {ph:g} mm patch fits in the imaged region; images too small") from None
    apex = fan_apex_mm(mask, spacing_mm=spacing)
    if apex is None:
        beam_cos, beam_sin = np.ones(len(grid)), np.zeros(len(grid))
    else:
        beam = np.arctan2(grid.x_mm - apex[0], grid.y_mm - apex[1])
        beam_cos, beam_sin = np.cos(beam), np.sin(beam)
    strides = np.asarray(sorted(set(int(s) for s in opts["strides"])), dtype=np.int64)
    starts = [np.arange(n - s) for s in strides if s < n]
    pairs = np.empty((0, 2), np.int64)
    if starts:
        pairs = np.concatenate([np.stack([k, k + s], axis=1) for k, s in zip(starts, strides)])
    meas = _Measurements(stack, mask, spacing, model, grid, beam_cos, beam_sin, params, cov, ok, chain,
                         centroid, moments, pairs, np.empty((0, len(grid)), np.float32),
                         np.array(fan_contact_mm(mask, spacing_mm=spacing, apex_mm=apex)),
                         float(opts["dark_fraction"]))
    rho = np.empty((pairs.shape[0], len(grid)), np.float32)
    chunk = 2048
    bar = progress_bar(total=pairs.shape[0], desc="correlate", unit="pair", enabled=progress)
    with bar:
        for start in range(0, pairs.shape[0], chunk):
            stop = min(pairs.shape[0], start + chunk)
            rho[start:stop] = meas.correlate(pairs[start:stop])
            bar.update(stop - start)
    meas.rho = rho
    return meas


# --------------------------------------------------------------------------- plane fits (batched)


def _planes_of(transforms):
    """(M, 3) plane (tz, a, b) of frame j in frame i's coordinates from T_{i←j} (M, 4, 4)."""
    normal = transforms[:, :3, 2]  # R e_z; the plane passes through t
    nz = np.where(np.abs(normal[:, 2]) > 1e-9, normal[:, 2], 1e-9)
    a, b = -normal[:, 0] / nz, -normal[:, 1] / nz
    t = transforms[:, :3, 3]
    return np.stack([t[:, 2] - a * t[:, 0] - b * t[:, 1], a, b], axis=1)


def _tilt_per_patch(planes, theta, meas):
    """(M, P) rotation about each patch's beam-lateral axis from plane slopes (small angles)."""
    c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
    a, b = planes[:, 1:2], planes[:, 2:3]
    alpha, beta = c * b - s * a, -c * a - s * b
    return alpha * meas.beam_cos[None, :] - beta * meas.beam_sin[None, :]


PIVOT_START_A = np.linspace(-1.5, 1.5, 7)  # pivot fits' start slopes, in units of the farthest
PIVOT_START_B = np.linspace(0.0, 1.5, 6)  # patch's distance over its lateral / depth offset


def fit_planes(rho, theta, meas, *, pivot_sigma_mm=None, prior_mm=3.0, f_scale=2.0, rho_sigma_floor=0.02,
               iterations=12):
    """Robust |plane| fits in ρ space for many pairs at once (same patch grid).

    Parameters
    ----------
    rho : (M, P) ndarray
        Patch correlations (NaN: ignored).
    theta : (M,) ndarray
        In-plane rotation of each pair (rad).
    meas : _Measurements
        Patch grid, model and contact point.
    pivot_sigma_mm : float, optional
        With a value, a prior ``z(contact) = 0 ± pivot_sigma_mm``, and the fit also starts from
        planes through the contact on a grid of slopes (``PIVOT_START_A``, ``PIVOT_START_B``).
    prior_mm : float
        Weak prior ``z = 0 ± prior_mm`` at the corners of the patch grid: a fully decorrelated pair
        only says "far", and would otherwise let the plane run off.
    f_scale, rho_sigma_floor : float
        Soft-L1 scale (σ units) and the floor added to the model's ρ spread.
    iterations : int
        Levenberg-Marquardt iterations.

    Returns
    -------
    planes : (M, 3) ndarray
        (tz, a, b) at the image-mm origin, canonical sign (z ≥ 0 at the grid centroid).
    covariance : (M, 3, 3) ndarray
    """
    model = meas.model
    x, y = meas.grid.x_mm, meas.grid.y_mm
    x0, y0 = x.mean(), y.mean()
    design = np.stack([np.ones_like(x), x - x0, y - y0], axis=1)  # (P, 3)
    valid = np.isfinite(rho)
    r = np.where(valid, rho, 0.0)
    m = rho.shape[0]
    th = theta[:, None]
    noise = model.parameters(y).noise
    lo, hi = model.usable_rho
    scale0 = model.scale(y, th)
    inner = np.clip(np.where(valid, r / scale0, hi), lo * (1 + 1e-9), hi * (1 - 1e-9))
    start_d = np.nan_to_num(model.distance(inner * scale0, y, th)[0])
    # prior rows (K, 3) on the centred parameters and their σ
    corners = [(xq, yq) for xq in np.quantile(x, [0.05, 0.95]) for yq in np.quantile(y, [0.05, 0.95])]
    prior = [np.array([1.0, xq - x0, yq - y0]) for xq, yq in corners]
    prior_sd = [np.full(m, float(prior_mm))] * len(prior)
    if pivot_sigma_mm is not None:
        prior.append(np.array([1.0, meas.contact[0] - x0, meas.contact[1] - y0]))
        prior_sd.append(np.broadcast_to(np.asarray(pivot_sigma_mm, dtype=np.float64), (m,)))
    prior = np.array(prior)  # (K, 3)
    prior_w = 1.0 / np.stack(prior_sd, axis=1) ** 2  # (M, K)
    prior_jtj = np.einsum("mk,ki,kj->mij", prior_w, prior, prior)

    def cost_of(p, spread=None):
        z = p @ design.T
        tilt = _tilt_per_patch(_origin(p), theta, meas)
        expected = model.rho(z, y, th, tilt)
        if spread is None:
            spread = noise * (1.0 - expected**2) + rho_sigma_floor
        u = np.where(valid, (r - expected) / spread, 0.0)
        c = np.sum(2.0 * f_scale**2 * (np.sqrt(1.0 + (u / f_scale) ** 2) - 1.0), axis=1)
        c += np.sum(prior_w * (p @ prior.T) ** 2, axis=1)
        return c, u, z, tilt, expected, spread

    def _origin(p):
        return np.stack([p[:, 0] - p[:, 1] * x0 - p[:, 2] * y0, p[:, 1], p[:, 2]], axis=1)

    # starts: sign patterns (a plane crossing the image makes a V in |d|), refined by re-signing
    patterns = [np.ones_like(x)]
    for q in (0.25, 0.5, 0.75):
        patterns.append(np.where(x < np.quantile(x, q), -1.0, 1.0))
        patterns.append(np.where(y < np.quantile(y, q), -1.0, 1.0))
    wv = valid.astype(np.float64)
    normal = np.einsum("mp,pi,pj->mij", wv, design, design) + 1e-9 * np.eye(3)
    best_p, best_c = None, None
    for pattern in patterns:
        signs = np.broadcast_to(pattern, rho.shape)
        for _ in range(3):
            rhs = np.einsum("mp,pi->mi", wv * signs * start_d, design)
            p = np.linalg.solve(normal, rhs[..., None])[..., 0]
            signs = np.where(p @ design.T < 0, -1.0, 1.0)
        c = cost_of(p)[0]
        if best_p is None:
            best_p, best_c = p, c
        else:
            better = c < best_c
            best_p[better], best_c[better] = p[better], c[better]
    if pivot_sigma_mm is not None:
        # Planes through the contact, on a grid of slopes. A fast fan decorrelates mostly by its
        # tilt, so ρ says little about |z| and the starts above often end in a plane far from the
        # contact; the prior alone does not pull LM out of that basin. ±p cost the same: b ≥ 0.
        xc, yc = meas.contact[0], meas.contact[1]
        reach = np.nanquantile(np.where(valid, start_d, np.nan), 0.9, axis=1)
        reach = np.where(np.isfinite(reach), reach, 0.0)  # mm: about the farthest patch's distance
        a_unit = reach / max(float(np.abs(x - xc).max()), 1e-6)
        b_unit = reach / max(float(np.abs(y - yc).max()), 1e-6)
        for fa in PIVOT_START_A:
            for fb in PIVOT_START_B:
                a, b = fa * a_unit, fb * b_unit
                p = np.stack([a * (x0 - xc) + b * (y0 - yc), a, b], axis=1)
                c = cost_of(p)[0]
                better = c < best_c
                best_p[better], best_c[better] = p[better], c[better]
    p = best_p
    # Gauss-Newton / Levenberg-Marquardt with soft-L1 reweighting; ρ spread frozen per iteration
    lam = np.full(m, 1e-3)
    cost, u, z, tilt, expected, spread = cost_of(p)
    tilt_precision = model.parameters(y).tilt_precision
    c_t, s_t = np.cos(theta)[:, None], np.sin(theta)[:, None]
    for _ in range(iterations):
        slope = model.rho_slope(z, y, th, tilt) * np.where(z < 0, -1.0, 1.0)
        jac = (-slope / spread)[..., None] * design[None]  # ∂u/∂p, (M, P, 3)
        # tilt factor exp(−½ α_k² P_α): α_k depends on a, b
        dalpha = np.stack([np.zeros_like(c_t), -s_t, c_t], -1)[:, 0]  # ∂α/∂(tz_c, a, b)
        dbeta = np.stack([np.zeros_like(c_t), -c_t, -s_t], -1)[:, 0]
        dtilt = (meas.beam_cos[None, :, None] * dalpha[:, None, :]
                 - meas.beam_sin[None, :, None] * dbeta[:, None, :])
        jac += ((expected * tilt * tilt_precision) / spread)[..., None] * dtilt
        weight = np.where(valid, 1.0 / np.sqrt(1.0 + (u / f_scale) ** 2), 0.0)  # soft-L1 IRLS
        jtj = np.einsum("mp,mpi,mpj->mij", weight, jac, jac)
        jtr = np.einsum("mp,mpi,mp->mi", weight, jac, u)
        jtj += prior_jtj
        jtr += (prior_w * (p @ prior.T)) @ prior
        scaled = np.diagonal(jtj, axis1=1, axis2=2)[:, None, :] * np.eye(3) + 1e-9 * np.eye(3)
        damped = jtj + lam[:, None, None] * scaled
        step = -np.linalg.solve(damped, jtr[..., None])[..., 0]
        trial = p + step
        new = cost_of(trial, spread)
        old = cost_of(p, spread)[0]
        better = new[0] < old
        p = np.where(better[:, None], trial, p)
        lam = np.where(better, lam * 0.3, lam * 10.0)
        cost, u, z, tilt, expected, spread = cost_of(p)
    slope = model.rho_slope(z, y, th, tilt) * np.where(z < 0, -1.0, 1.0)
    jac = (-slope / spread)[..., None] * design[None]
    jtj = np.einsum("mp,mpi,mpj->mij", valid.astype(float), jac, jac)
    jtj += prior_jtj
    dof = np.maximum(valid.sum(axis=1) - 3, 1)
    inflate = np.maximum(1.0, np.sum(np.where(valid, u**2, 0.0), axis=1) / dof)
    cov_c = np.linalg.pinv(jtj) * inflate[:, None, None]
    flip = p[:, 0] < 0  # canonical: plane above frame i at the grid centroid
    p[flip] *= -1.0
    to_origin = np.array([[1.0, -x0, -y0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    return _origin(p), to_origin @ cov_c @ to_origin.T


# --------------------------------------------------------------------------- key steps and signs


def _key_rho(meas, rows):
    """Median rotation-corrected ρ of the bright patches of pairs ``rows`` (NaN if none)."""
    rho = meas.rho[rows].astype(np.float64)
    theta = meas.inplane_between(meas.pairs[rows, 0], meas.pairs[rows, 1])[:, 2]
    with np.errstate(all="ignore"):
        corrected = rho / meas.model.scale(meas.grid.y_mm, theta[:, None])
    return _row_nanmedian(np.where(np.isfinite(corrected), corrected, np.nan))


def _key_frames(meas, key_rho):
    """(K,) key frames: from each, the longest measured stride whose median ρ stays ≥ ``key_rho``."""
    n = meas.n_frames
    index = {(int(i), int(j)): k for k, (i, j) in enumerate(meas.pairs)}
    strides = sorted({int(j - i) for i, j in meas.pairs})
    median = _key_rho(meas, np.arange(meas.pairs.shape[0]))
    keys = [0]
    while keys[-1] < n - 1:
        k = keys[-1]
        best = 1
        for s in strides:
            row = index.get((k, k + s))
            if row is None:
                break
            value = median[row]
            if np.isfinite(value) and value < key_rho:
                break
            best = s
        keys.append(min(k + best, n - 1))
    return np.asarray(keys, dtype=np.int64)


def _key_steps(meas, key_rho):
    """Key frames (K,), the ρ (K − 1, P) of each key step (k_m, k_m+1), its in-plane rotation (K − 1,)."""
    keys = _key_frames(meas, key_rho)
    rho = meas.correlate(np.stack([keys[:-1], keys[1:]], axis=1))
    theta = meas.inplane_between(keys[:-1], keys[1:])[:, 2]
    return keys, rho, theta


def _anchor_design(meas):
    """(9, 3) design rows [1, x, y] of anchor points spread over the patch grid."""
    x, y = meas.grid.x_mm, meas.grid.y_mm
    xs = np.quantile(x, [0.1, 0.5, 0.9])
    ys = np.quantile(y, [0.1, 0.5, 0.9])
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([np.ones(gx.size), gx.ravel(), gy.ravel()], axis=1)


def _triplet_terms(meas, keys, planes, opts):
    """Pair costs (n−1, 2) and triple costs (n−2, 4) of the sign DP from two- and three-step spans."""
    n = keys.size - 1
    pair_costs = np.zeros((max(n - 1, 0), 2))
    triple_costs = np.zeros((max(n - 2, 0), 4))
    spans = [(m, 2) for m in range(n - 1)] + [(m, 3) for m in range(n - 2)]
    if not spans:
        return pair_costs, triple_costs
    span_pairs = np.array([(keys[m], keys[m + c]) for m, c in spans])
    rho = meas.correlate(span_pairs)
    inplane = meas.inplane_between(keys[:-1], keys[1:])
    # T_{k_m←k_{m+1}} of every key step with its canonical plane (+) and the mirrored one (−)
    steps = np.stack([_step_matrix(inplane, planes, meas.centroid, meas.moments),
                      _step_matrix(inplane, -planes, meas.centroid, meas.moments)])
    q = np.stack([meas.grid.x_mm, meas.grid.y_mm, np.zeros(len(meas.grid))])
    weight = float(opts["triplet_weight"])
    span_theta = meas.inplane_between(span_pairs[:, 0], span_pairs[:, 1])[:, 2]
    for (m, count), r, theta in zip(spans, rho, span_theta):
        # sign patterns relative to step m (+): same / opposite for two steps; 4 patterns for three
        patterns = [(0, 0), (0, 1)] if count == 2 else [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]
        transforms = np.empty((len(patterns), 4, 4))
        for h, pattern in enumerate(patterns):
            t = steps[pattern[0], m]
            for offset in range(1, count):
                t = t @ steps[pattern[offset], m + offset]
            transforms[h] = t
        # elevation of frame k_m's patch centres in the far frame: (T⁻¹ q)_z = n · (q − t)
        normal, shift = transforms[:, :3, 2], transforms[:, :3, 3]
        z = normal @ q - np.einsum("hi,hi->h", normal, shift)[:, None]
        tilt = _tilt_per_patch(_planes_of(transforms), np.full(len(transforms), theta), meas)
        costs = weight * triplet_costs(z, r, depth_mm=meas.grid.y_mm, model=meas.model, rotation_rad=theta,
                                       tilt_rad=tilt, f_scale=opts["f_scale"],
                                       rho_sigma_floor=opts["rho_sigma_floor"])
        costs -= costs.min()
        if count == 2:
            pair_costs[m] += costs
        else:
            triple_costs[m] += costs
    return pair_costs, triple_costs


STOP_MIN_FRAMES = 4  # a key step this long, and STOP_FACTOR times the median, spans a stop
STOP_FACTOR = 4.0
STOP_SIDE_STEPS = 6  # key frames on each side of a stop correlated across it
STOP_RELATION_STEPS = 3  # moving key steps on each side whose signed sum is the motion there
STOP_MIN_GAIN = 0.25  # reversal gain that calls a turn (pauses measured ≤ 0.06 but one, turns ~0.6)
STOP_MIN_COS = 0.5  # the two sides' motions must be this parallel or antiparallel to act on


def _stops(keys):
    """(first, last) key-step index of each run of stop steps (:data:`STOP_MIN_FRAMES`,
    :data:`STOP_FACTOR`) with a key step on either side."""
    lengths = np.diff(keys)
    if not lengths.size:
        return []
    slow = lengths >= max(STOP_MIN_FRAMES, STOP_FACTOR * np.median(lengths))
    edges = np.diff(np.concatenate([[0], slow.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
    return [(int(a), int(b)) for a, b in zip(starts, ends) if a >= 1 and b <= lengths.size - 2]


def _reverse_at_stops(meas, keys, elevation, dp):
    """Stage 2a: the relation across each stop from the frames on its two sides.

    The hand eases into and out of every stop, so velocity smoothness cannot tell a turn from a
    pause, and the key step spanning the stop is poorly fitted, which misleads the triplet terms
    (at 480×640 the DP went on through 13 of the 52 turns of five scans, several with margins of
    80-360: ``benchmarks/README.md``). Here the key frames on either side of a stop
    (:func:`_stops`) are correlated across it: after a reversal each frame meets its twin on the
    way back (:func:`speckle_rec.direction.reversal_gain`). ``elevation`` (M, A) is each key
    step's canonical elevation at the anchors (mm), ``dp`` the sign DP's resolution. Where the gain calls a reversal and the signed
    motions of the nearest moving steps on the two sides agree (cosine above
    :data:`STOP_MIN_COS`), every later sign is flipped; the stop's junctions then count as sure as
    the DP's surest for the slide stage. A gain below the threshold says nothing: a turn whose two
    paths differ in the other angle shows little.

    Returns a :class:`speckle_rec.direction.SignResolution` and a diagnostics dict: per stop its key
    steps, first and last frame, gain, the cosine of the two sides' motions under the signs so far
    (None without moving steps on both sides), whether it counts as a turn and whether it flipped.
    """
    clock = time.perf_counter()
    signs = np.array(dp.signs, dtype=np.int64)
    margins = np.array(dp.flip_margin, dtype=np.float64)
    moving = moving_steps(elevation)
    sure = float(margins.max()) if margins.size else 0.0
    tested = []
    for a, b in _stops(keys):
        start = max(a - STOP_SIDE_STEPS, 0)
        before, after = keys[start:a + 1][::-1], keys[b + 1:b + 2 + STOP_SIDE_STEPS]
        pairs = np.stack(np.meshgrid(before, after, indexing="ij"), axis=-1).reshape(-1, 2)
        gain = reversal_gain(_row_nanmedian(meas.correlate(pairs)).reshape(before.size, after.size))
        near = start + np.flatnonzero(moving[start:a])[::-1][:STOP_RELATION_STEPS]
        far = b + 1 + np.flatnonzero(moving[b + 1:b + 1 + STOP_SIDE_STEPS])[:STOP_RELATION_STEPS]
        cosine = None
        if near.size and far.size:
            v0, v1 = signs[near] @ elevation[near], signs[far] @ elevation[far]
            cosine = float(v0 @ v1 / max(np.linalg.norm(v0) * np.linalg.norm(v1), 1e-12))
        turn = gain > STOP_MIN_GAIN and cosine is not None and abs(cosine) > STOP_MIN_COS
        if turn:
            margins[a - 1:b + 1] = np.maximum(margins[a - 1:b + 1], sure)
            if cosine > 0:
                signs[b + 1:] *= -1
        tested.append({"steps": [a, b], "frames": [int(keys[a]), int(keys[b + 1])], "gain": round(gain, 3),
                       "cosine": None if cosine is None else round(cosine, 3), "turn": bool(turn),
                       "flipped": bool(turn and cosine > 0)})
    info = {"tested": tested, "turns": sum(t["turn"] for t in tested),
            "flipped": sum(t["flipped"] for t in tested), "seconds": round(time.perf_counter() - clock, 3)}
    return SignResolution(signs, margins, dp.cost), info


SLIDE_WINDOW = 60  # key steps on each side of a quiet stretch whose same-view pairs vote on it
SLIDE_MIN_PAIRS = 3  # with fewer votes the DP's relation across a quiet stretch stays


def _resolve_key_signs(meas, keys, planes, covariance, opts, threads, *, pivot=False, sign_oracle=None):
    """Signs of the key steps (stage 2), or ``sign_oracle``'s; returns signs and a diagnostics dict.

    ``pivot``: the scan fans about a fixed skin contact (:func:`_decide_pivot`); only such scans
    come back to the views the slide stage compares.
    """
    n = keys.size - 1
    anchors = _anchor_design(meas)
    lengths = np.diff(keys).astype(np.float64)
    elevation = planes @ anchors.T
    velocity = elevation / lengths[:, None]
    stops = None
    if sign_oracle is None:
        noise = np.sqrt(np.einsum("ai,mij,aj->ma", anchors, covariance, anchors).mean(axis=1)) / lengths
        pair_costs, triple_costs = _triplet_terms(meas, keys, planes, opts)
        scale = np.median(np.linalg.norm(velocity, axis=1)) if n else 1.0
        result = resolve_signs(velocity, noise=noise, times=0.5 * (keys[1:] + keys[:-1]),
                               acceleration=0.05 * scale, pair_costs=pair_costs, triple_costs=triple_costs)
        if opts["stops"]:
            result, stops = _reverse_at_stops(meas, keys, elevation, result)
        signs, uncertain, slide = result.signs, int(np.sum(result.flip_margin < 1.0)), None
        if opts["slide"] and pivot:
            signs, slide = _slide_across_quiet_stretches(meas, keys, planes, elevation, result, threads)
        elif opts["slide"]:
            slide = {"skipped": "no fixed skin contact"}
    else:
        signs, uncertain, slide = np.asarray(sign_oracle(keys, planes), dtype=np.int64), None, None
    signed = signs[:, None] * velocity
    reversals = int(np.sum(np.einsum("ma,ma->m", signed[1:], signed[:-1]) < 0))
    return signs, {"key_steps": int(n), "reversals": reversals, "uncertain_junctions": uncertain,
                   "oracle": sign_oracle is not None, "stops": stops, "slide": slide}


def _slide_across_quiet_stretches(meas, keys, planes, elevation, dp, threads):
    """Stage 2b (``slide``, on by default): the sign across each quiet stretch from the anatomy slide.

    The DP cannot carry a sign across a run of key steps that hardly move out of plane (the
    rotation protocol's in-plane rock). Same-view slide pairs decide instead, in two steps:

    1. the pairs straddling each stretch within ``SLIDE_WINDOW`` key steps vote on it, and may move
       the flip to a DP error beside it (:func:`speckle_rec.slide.vote_across_stretches`; ``dp`` is
       the sign DP's :class:`speckle_rec.direction.SignResolution`, whose margins place it);
    2. the pairs between any two runs of steps between stretches choose the relations at all
       stretches together (:func:`speckle_rec.slide.vote_between_segments`), with up to
       ``MAX_STRETCHES`` stretches. A scan comes back to a view long after it left it (after the
       spin, to the fan before the rock), out of the window's reach. Only pairs whose key frames,
       chained from the key steps, come within ``MAX_VIEW_MM`` of each other under some relation
       at the stretches between them vote: thumbnails of planes 90° apart can look alike
       (:func:`speckle_rec.slide.view_distances`);
    3. where no voting pair of runs spans the stretches between two runs that travel
       ``CROSS_MIN_TRAVEL_MM`` or more (the spin leaves the fan's views for good), the crossing
       frames of those two runs decide (:func:`_cross_unlinked_stretches`).

    With more than ``MAX_STRETCHES`` stretches (the rock's short moves can split its quiet phases
    into many), steps 2 and 3 treat the runs that travel less than ``CROSS_MIN_TRAVEL_MM`` as part
    of the stretches around them (:func:`_travelling_steps`; their steps' pairs do not vote).

    Returns the signs and a diagnostics dict.
    """
    clock = time.perf_counter()
    moving = moving_steps(elevation)
    stretches = quiet_stretches(moving)
    first = second = steps = np.zeros(0, np.int64)
    cosine = np.zeros(0)
    if stretches:  # else nothing to vote on
        candidates = np.flatnonzero(moving)
        similarity = np.zeros((moving.size, moving.size))
        middles = (keys[candidates] + keys[candidates + 1]) // 2
        similarity[np.ix_(candidates, candidates)] = view_similarity(meas.stack, middles, meas.spacing)
        steps = paired_steps(similarity, moving)
        fields = slide_fields(meas.stack, meas.mask, meas.spacing, keys, planes, model=meas.model,
                              steps=steps, threads=threads)
        first, second, cosine = same_view_pairs(fields, similarity, moving)
    signs, counts = vote_across_stretches(dp.signs, moving, first, second, cosine, window=SLIDE_WINDOW,
                                          min_pairs=SLIDE_MIN_PAIRS, margins=dp.flip_margin)
    merged = len(stretches) > MAX_STRETCHES
    if merged:  # the rock's short moves split its quiet phases: runs that hardly travel join them
        moving = _travelling_steps(moving, elevation)
        stretches = quiet_stretches(moving)
    if not stretches:
        runs = {"skipped": "no quiet stretch"}
    elif len(stretches) > MAX_STRETCHES:
        runs = {"skipped": f"more than {MAX_STRETCHES} quiet stretches"}
    else:
        segment = segments(moving)
        across = np.flatnonzero((segment[first] != segment[second]) & moving[first] & moving[second])
        poses = _initial_poses(meas, keys, planes, signs)[keys]
        points = np.stack([meas.grid.x_mm, meas.grid.y_mm], axis=1)
        near = across[view_distances(poses, first[across], second[across], segment, points) <= MAX_VIEW_MM]
        margins = np.array([dp.flip_margin[start - 1:end + 1].min() for start, end in stretches])
        signs, runs = vote_between_segments(signs, segment, first[near], second[near], cosine[near],
                                            min_pairs=SLIDE_MIN_PAIRS, margins=margins)
        runs = dict(runs, pairs_across=int(across.size), pairs_near=int(near.size), merged=merged)
        signs, lines = _cross_unlinked_stretches(meas, keys, planes, elevation, moving, signs, stretches,
                                                 runs["unlinked"])
        runs = dict(runs, lines=lines)
    return signs, dict(counts, flows=int(steps.size), same_view_pairs=int(first.size), runs=runs,
                       seconds=round(time.perf_counter() - clock, 3))


CROSS_MIN_TRAVEL_MM = 5.0  # runs that travel less out of plane are passed over (their planes barely turn)
CROSS_MIN_PAIRS = 20  # crossing pairs a flip gain needs
CROSS_MIN_GAIN = 0.02  # a flip must raise the mean line correlation by more (benchmarks/README.md)


def _travelling_steps(moving, elevation):
    """(M,) bool: the moving key steps of runs (:func:`speckle_rec.slide.segments`) that travel
    ``CROSS_MIN_TRAVEL_MM`` or more out of plane (:func:`speckle_rec.slide.step_travel` of their
    moving steps, summed)."""
    segment = segments(moving)
    travel = np.bincount(segment, weights=step_travel(elevation) * moving)
    return moving & (travel >= CROSS_MIN_TRAVEL_MM)[segment]


def _cross_unlinked_stretches(meas, keys, planes, elevation, moving, signs, stretches, unlinked):
    """Step 3 of the slide stage: relations that no same-view pair decided, from crossing lines.

    Runs of key steps with ``CROSS_MIN_TRAVEL_MM`` of out-of-plane travel or more are *major*; the
    quiet stretches between two consecutive major runs (with the runs between them, which hardly
    move: the protocol's rock often holds a few short moves) set the relation of the two. Where
    one of those stretches is unlinked (no voting pair of runs spans it), ``FRAMES_PER_SIDE``
    frames of each major run's moving steps are paired, chained from the signed key steps, and
    the relation at the last unlinked stretch is flipped when mirroring the motion after it raises
    their mean line correlation on band-passed frames by more than ``CROSS_MIN_GAIN``
    (:func:`speckle_rec.crossing.flip_gain`). Flips at unlinked stretches change no vote of
    step 2, and reflecting both runs of a later pair leaves its gain as it was, so the pairs of
    runs are decided one by one.

    Returns the signs and a diagnostics dict: per test its stretch, major runs, first frame after
    the stretch, the first and last paired frame of each run, gain, pairs and whether it flipped.
    """
    signs = np.array(signs, dtype=np.int64)
    segment = segments(moving)
    major = np.unique(segment[_travelling_steps(moving, elevation)])
    poses = None
    tested = []
    for r1, r2 in zip(major[:-1].tolist(), major[1:].tolist()):
        free = [s for s in range(r1, r2) if s in unlinked]
        if not free:
            continue
        if poses is None:
            poses = _initial_poses(meas, keys, planes, signs)
        end = stretches[free[-1]][1]
        k = int(keys[end + 1])
        before = np.flatnonzero((segment == r1) & moving)
        after = np.flatnonzero((segment == r2) & moving)
        first = spread_frames(keys[before[0]], keys[before[-1] + 1])
        second = spread_frames(max(k + 1, keys[after[0]]), keys[after[-1] + 1])
        frames = np.concatenate([first, second])
        images = dict(zip(frames.tolist(), band_pass(meas.stack[frames], meas.spacing)))
        gain, pairs = flip_gain(images, meas.mask, meas.spacing, poses, k, first, second)
        flip = bool(pairs >= CROSS_MIN_PAIRS and gain > CROSS_MIN_GAIN)
        if flip:
            signs[end + 1:] *= -1
        tested.append({"stretch": free[-1], "runs": [r1, r2], "frame": k,
                       "before": [int(first[0]), int(first[-1])], "after": [int(second[0]), int(second[-1])],
                       "gain": round(gain, 4) if pairs else None, "pairs": int(pairs), "flipped": flip})
    return signs, {"tested": tested, "flipped": sum(t["flipped"] for t in tested)}


LEVEL_MIN_TRAVEL_MM = 20.0  # net out-of-plane travel below which a scan is not levelled
LEVEL_MAX_GRADIENT = 0.005  # per mm (10 % per 20 mm of depth): the correction stays within this
LEVEL_ITERATIONS = 3
LEVEL_TOLERANCE_RAD = math.radians(0.25)


def _level_sweep(meas, rho, theta, planes, signs, opts):
    """Stage 2c (``level_sweeps``, sweeps only): σ's depth gradient that levels the sweep.

    For a translation, a distance bias that grows linearly with depth and a steady tilt about image
    x give the same ρ at every stride, so only the curves decide how far a sweep turns about image
    x, and a 1 % per 20 mm error in their depth profile turns a 100 mm sweep by about 2.5°. This
    stage assumes instead that a sweep ends at the tilt it started with: with the key steps' signed
    planes (tz, a, b), the net tilt ``T = Σ s·b`` (rad) and the net elevation at mid depth ``Z``
    give the gradient ``−T / Z`` per mm (:meth:`DecorrelationModel.with_sigma_gradient`); the key
    steps are fitted again with it (a few times, as the fit is not linear) and the bundle
    adjustment uses it. The gradient is capped at ``LEVEL_MAX_GRADIENT``; scans whose net travel
    is under ``LEVEL_MIN_TRAVEL_MM`` are left alone.

    Returns (meas with the levelled model, planes, diagnostics dict).
    """
    base = meas.model
    centre = np.array([1.0, meas.grid.x_mm.mean(), base.mid_depth_mm])  # where the gradient pivots

    def net(planes):  # net tilt about image x (rad) and net elevation at mid depth (mm)
        return float(np.sum(signs * planes[:, 2])), float(np.sum(signs * (planes @ centre)))

    tilt, travel = net(planes)
    info = {"net_tilt_deg_before": round(math.degrees(tilt), 3), "net_travel_mm": round(travel, 3)}
    if not (math.isfinite(tilt) and math.isfinite(travel)):
        return meas, planes, {"skipped": "key-step planes not finite"}
    if abs(travel) < LEVEL_MIN_TRAVEL_MM:
        return meas, planes, dict(info, skipped=f"net travel under {LEVEL_MIN_TRAVEL_MM:g} mm")
    gradient, fits = 0.0, 0
    meas = copy.copy(meas)  # the caller's measurements keep their model
    while fits < LEVEL_ITERATIONS and abs(tilt) > LEVEL_TOLERANCE_RAD:
        wanted = float(np.clip(gradient - tilt / travel, -LEVEL_MAX_GRADIENT, LEVEL_MAX_GRADIENT))
        if wanted == gradient:
            break
        gradient, fits = wanted, fits + 1
        meas.model = base.with_sigma_gradient(gradient)
        planes, _ = fit_planes(rho, theta, meas, f_scale=opts["f_scale"],
                               rho_sigma_floor=opts["rho_sigma_floor"])
        tilt, travel = net(planes)
    return meas, planes, dict(info, gradient_percent_per_20mm=round(2000.0 * gradient, 3), fits=fits,
                              net_tilt_deg=round(math.degrees(tilt), 3))


# --------------------------------------------------------------------------- initial trajectory


def _initial_poses(meas, keys, planes, signs):
    """(N, 4, 4) frame → frame 0 poses chained from the signed key steps."""
    n = meas.n_frames
    frames = np.arange(1, n)
    step = np.searchsorted(keys, frames, side="left") - 1  # key step m holds frames keys[m] + 1 … keys[m + 1]
    start = keys[step]
    share = (frames - start) / (keys[step + 1] - start)
    inplane = meas.inplane_between(start, frames)
    # every frame's transform from its key step's start frame, in one batch
    from_start = _step_matrix(inplane, (share * signs[step])[:, None] * planes[step], meas.centroid, meas.moments)
    poses = np.empty((n, 4, 4))
    poses[0] = np.eye(4)
    for m in range(keys.size - 1):
        k0, k1 = keys[m], keys[m + 1]
        poses[k0 + 1:k1 + 1] = poses[k0] @ from_start[k0:k1]
    return poses


# --------------------------------------------------------------------------- bundle adjustment


def _params_from_poses(poses):
    out = np.empty((poses.shape[0], 6))
    out[:, :3] = Rotation.from_matrix(poses[:, :3, :3]).as_rotvec()
    out[:, 3:] = poses[:, :3, 3]
    return out


class _PatchGeometry(NamedTuple):
    """Patch geometry of a window's pairs (M pairs, P patches), for the ρ residuals and their derivatives."""

    nj: np.ndarray  # (M, 3) frame j's normal in frame 0
    rotated: np.ndarray  # (M, P, 3) R_i q
    world: np.ndarray  # (M, P, 3) R_i q + τ_i − τ_j
    n: np.ndarray  # (M, 3) frame j's normal in frame i
    nz: np.ndarray  # (M,) its z component, kept away from 0
    cos_t: np.ndarray  # (M,) cos / sin of the pair's in-plane rotation
    sin_t: np.ndarray
    z: np.ndarray  # (M, P) signed elevation of each patch centre from frame j's plane, mm
    tilt: np.ndarray  # (M, P) tilt along each patch's beam, rad
    expected: np.ndarray  # (M, P) the model's ρ


class _Window:
    """Residuals and sparse Jacobian of one bundle-adjustment window.

    Variables: poses of frames ``free`` (6 each). Frames in ``fixed`` keep their current poses.
    """

    def __init__(self, meas, params, free, opts, pivot, rows, theta):
        self.meas = meas
        self.params = params  # (N, 6) current poses of all frames (fixed ones are read from here)
        self.free = free
        self.opts = opts
        self.pivot = pivot
        lo = free[0]
        self.column = np.full(params.shape[0], -1, np.int64)
        self.column[free] = np.arange(free.size)
        model = meas.model
        # in-plane residuals: consecutive pairs (k, k+1) touching a free frame, k >= lo − 1
        k = np.arange(max(lo - 1, 0), free[-1])
        self.ip_i, self.ip_j = k, k + 1
        centroid = meas.centroid
        measured = meas.inplane[k]
        rot = _rot2(measured[:, 2])
        self.ip_centre = np.einsum("kij,j->ki", rot, centroid) + measured[:, :2]
        drot = np.einsum("kij,j->ki", _rot2(measured[:, 2] + 0.5 * np.pi), centroid)  # ∂(Rθ c)/∂θ
        jac = np.zeros((k.size, 3, 3))
        jac[:, 0, 0] = jac[:, 1, 1] = jac[:, 2, 2] = 1.0
        jac[:, :2, 2] = drot
        cov = jac @ meas.inplane_cov[k] @ np.swapaxes(jac, 1, 2) * opts["inplane_sigma_scale"] ** 2
        cov += np.diag([0.003**2, 0.003**2, 3e-5**2])
        self.ip_theta = measured[:, 2]
        self.ip_white = np.linalg.inv(np.linalg.cholesky(cov))  # (K, 3, 3) lower: r = W · e
        # patch residuals
        self.rows = rows
        pairs = meas.pairs[rows]
        self.pp_i, self.pp_j = pairs[:, 0], pairs[:, 1]
        rho = meas.rho[rows].astype(np.float64)
        self.valid = np.isfinite(rho)
        self.rho = np.where(self.valid, rho, 0.0)
        y = meas.grid.y_mm
        self.theta = theta[:, None]
        self.beam_cos, self.beam_sin = meas.beam_cos, meas.beam_sin
        self.tilt_precision = model.parameters(meas.grid.y_mm).tilt_precision
        self.q = np.stack([meas.grid.x_mm, y, np.zeros_like(y)], axis=1)  # (P, 3)
        self.y = y
        # smoothness: second differences for centres c with c−1, c+1 present and one of them free
        anchors = _anchor_design(meas)[[0, 2, 7]]  # top-left, top-right, bottom-middle
        self.anchors = np.stack([anchors[:, 1], anchors[:, 2], np.zeros(3)], axis=1)
        c = np.arange(max(lo - 1, 1), min(free[-1] + 1, params.shape[0] - 1))
        self.sm_c = c[(self.column[c - 1] >= 0) | (self.column[c] >= 0) | (self.column[c + 1] >= 0)]
        contact = meas.contact
        self.contact = np.array([contact[0], contact[1], 0.0])
        kk = np.arange(max(lo - 1, 0), free[-1])
        self.pv_k = kk
        self._structure()
        # Each ρ's spread is the model's at its expected value under the window's starting poses, not
        # at the measured value: spreads from the measurements weight the ρ that came out high more
        # (spread ∝ 1 − ρ²), which pulls every distance short (the sweeps' travel read 0.96 of the
        # truth; 0.98-0.99 this way, benchmarks/README.md).
        start = Rotation.from_rotvec(params[:, :3]).as_matrix(), params[:, 3:]
        expected = self._patch_geometry(*start).expected
        self.rho_sigma = model.rho_sigma(np.clip(expected, 0.0, 0.999), y) + opts["rho_sigma_floor"]

    # rows of each block: in-plane 3·K, patches valid count, smoothness 9·C, pivot K
    def _structure(self):
        self.n_ip = 3 * self.ip_i.size
        self.valid_index = np.nonzero(self.valid.ravel())[0]
        self.n_pp = self.valid_index.size
        self.n_sm = 9 * self.sm_c.size
        self.n_pv = self.pv_k.size if self.pivot else 0

    def _poses(self, x):
        p = self.params.copy()
        p[self.free] = x.reshape(-1, 6)
        rot = Rotation.from_rotvec(p[:, :3]).as_matrix()
        return p, rot

    def robust_mask(self):
        """(R,) bool: residuals that get the robust loss (the patch correlations)."""
        mask = np.zeros(self.n_ip + self.n_pp + self.n_sm + self.n_pv, bool)
        mask[self.n_ip:self.n_ip + self.n_pp] = True
        return mask

    def _patch_geometry(self, rot, tau):
        """:class:`_PatchGeometry` of every pair's patches at poses (rot, tau): z = n_j · (R_i q + τ_i − τ_j)
        and the model's expected ρ at |z| with the tilt factor."""
        i, j = self.pp_i, self.pp_j
        nj = rot[j][:, :, 2]  # (M, 3) frame j's normal in frame 0
        rotated = np.matmul(rot[i], self.q.T).transpose(0, 2, 1)  # R_i q, (M, P, 3)
        world = rotated + (tau[i] - tau[j])[:, None, :]
        z = np.matmul(world, nj[:, :, None])[..., 0]  # n_j · world per patch
        # tilt: frame j's normal in frame i, n = R_iᵀ n_j → slopes a = −n_x/n_z, b = −n_y/n_z →
        # (α, β) turned by the pair's in-plane angle → per patch α cos φ − β sin φ
        n = np.einsum("mba,mb->ma", rot[i], nj)
        nz = np.where(np.abs(n[:, 2]) > 1e-9, n[:, 2], 1e-9)
        slope_a, slope_b = -n[:, 0] / nz, -n[:, 1] / nz
        cos_t, sin_t = np.cos(self.theta[:, 0]), np.sin(self.theta[:, 0])
        alpha, beta = cos_t * slope_b - sin_t * slope_a, -cos_t * slope_a - sin_t * slope_b
        tilt = alpha[:, None] * self.beam_cos - beta[:, None] * self.beam_sin
        expected = self.meas.model.rho(z, self.y, self.theta, tilt)
        return _PatchGeometry(nj, rotated, world, n, nz, cos_t, sin_t, z, tilt, expected)

    def _patch_block(self, rot, tau, jl, jacobian, blocks, add, offset):
        """ρ of every patch against the model (see :meth:`_patch_geometry`), and its derivatives."""
        i, j = self.pp_i, self.pp_j
        nj, rotated, world, n, nz, cos_t, sin_t, z, tilt, expected = self._patch_geometry(rot, tau)
        model = self.meas.model
        res_pp = np.where(self.valid, (self.rho - expected) / self.rho_sigma, 0.0).ravel()[self.valid_index]
        blocks.append(res_pp)
        if jacobian:
            slope = model.rho_slope(z, self.y, self.theta, tilt) * np.where(z < 0, -1.0, 1.0)
            dr_dz = (-slope / self.rho_sigma).ravel()[self.valid_index]
            dr_dtilt = (expected * tilt * self.tilt_precision / self.rho_sigma).ravel()[self.valid_index]
            m_index, p_index = np.divmod(self.valid_index, self.q.shape[0])
            a = rotated.reshape(-1, 3)[self.valid_index]
            n_rep = nj[m_index]
            w_rep = world.reshape(-1, 3)[self.valid_index]
            d_i = np.empty((self.n_pp, 6))
            d_j = np.empty((self.n_pp, 6))
            d_i[:, :3] = np.einsum("ra,rab->rb", np.cross(a, n_rep), jl[i[m_index]])
            d_i[:, 3:] = n_rep
            d_j[:, :3] = np.einsum("ra,rab->rb", np.cross(n_rep, w_rep), jl[j[m_index]])
            d_j[:, 3:] = -n_rep
            d_i *= dr_dz[:, None]
            d_j *= dr_dz[:, None]
            # dn = −R_iᵀ [n_j]× (δ_j − δ_i), δ = J_l dω
            dn = -np.einsum("mba,mbc->mac", rot[i], _skew(nj))  # ∂n/∂δ_j (M, 3, 3)
            da = -dn[:, 0, :] / nz[:, None] + (n[:, 0] / nz**2)[:, None] * dn[:, 2, :]
            db = -dn[:, 1, :] / nz[:, None] + (n[:, 1] / nz**2)[:, None] * dn[:, 2, :]
            dalpha = cos_t[:, None] * db - sin_t[:, None] * da
            dbeta = -cos_t[:, None] * da - sin_t[:, None] * db
            dtilt = (dalpha[m_index] * self.beam_cos[p_index, None]
                     - dbeta[m_index] * self.beam_sin[p_index, None])
            dtilt *= dr_dtilt[:, None]  # ∂r/∂δ_j; ∂r/∂δ_i is its negative
            d_j[:, :3] += np.einsum("ra,rab->rb", dtilt, jl[j[m_index]])
            d_i[:, :3] -= np.einsum("ra,rab->rb", dtilt, jl[i[m_index]])
            rows = offset + np.arange(self.n_pp)
            for frames, derivs in ((i[m_index], d_i), (j[m_index], d_j)):
                add(rows, frames, derivs)

    def evaluate(self, x, jacobian):
        """Residuals (R,) at ``x`` (6 per free frame); with ``jacobian`` also the sparse (R, 6F) Jacobian."""
        p, rot = self._poses(x)
        tau = p[:, 3:]
        jl = _left_jacobian(p[:, :3])
        blocks, jac_rows, jac_cols, jac_vals = [], [], [], []
        offset = 0

        def add(rows, frames, derivs):
            """Jacobian entries of residual ``rows`` w.r.t. the 6 parameters of ``frames`` (if free)."""
            col = self.column[frames]
            keep = col >= 0
            jac_rows.append(np.repeat(rows[keep], 6))
            jac_cols.append(((6 * col[keep])[:, None] + np.arange(6)[None, :]).ravel())
            jac_vals.append(derivs[keep].ravel())

        # --- in-plane: centroid shift and rotation of T_{i←j}
        i, j = self.ip_i, self.ip_j
        ri, rj = rot[i], rot[j]
        c3 = np.array([self.meas.centroid[0], self.meas.centroid[1], 0.0])
        b = np.einsum("kab,b->ka", rj, c3) + tau[j] - tau[i]
        u = np.einsum("kba,kb->ka", ri, b)  # R_iᵀ b
        rij = np.einsum("kba,kbc->kac", ri, rj)
        sxx, syy, sxy = self.meas.moments
        m00, m01, m10, m11 = rij[:, 0, 0], rij[:, 0, 1], rij[:, 1, 0], rij[:, 1, 1]
        num = m10 * sxx - m01 * syy + (m11 - m00) * sxy
        den = m00 * sxx + m11 * syy + (m01 + m10) * sxy
        theta_pred = np.arctan2(num, den)
        dtheta = (theta_pred - self.ip_theta + np.pi) % (2 * np.pi) - np.pi
        err = np.concatenate([u[:, :2] - self.ip_centre, dtheta[:, None]], axis=1)
        res_ip = np.einsum("kab,kb->ka", self.ip_white, err)
        blocks.append(res_ip.ravel())
        if jacobian:
            rit = np.swapaxes(ri, 1, 2)
            d_u = np.zeros((i.size, 3, 12))  # ∂u/∂(ω_i, τ_i, ω_j, τ_j)
            d_u[:, :, 0:3] = rit @ _skew(b) @ jl[i]
            d_u[:, :, 3:6] = -rit
            d_u[:, :, 6:9] = -rit @ _skew(np.einsum("kab,b->ka", rj, c3)) @ jl[j]
            d_u[:, :, 9:12] = rit
            # ∂θ/∂δ: dR_ij = R_iᵀ [δ_j − δ_i]× R_j
            d_theta = np.zeros((i.size, 12))
            for axis in range(3):
                e = np.zeros(3)
                e[axis] = 1.0
                dm = np.einsum("kba,bc,kcd->kad", ri, _skew(e), rj)
                dn = dm[:, 1, 0] * sxx - dm[:, 0, 1] * syy + (dm[:, 1, 1] - dm[:, 0, 0]) * sxy
                dd = dm[:, 0, 0] * sxx + dm[:, 1, 1] * syy + (dm[:, 0, 1] + dm[:, 1, 0]) * sxy
                g = (den * dn - num * dd) / (num**2 + den**2)
                d_theta[:, 6:9] += g[:, None] * jl[j][:, axis, :]
                d_theta[:, 0:3] -= g[:, None] * jl[i][:, axis, :]
            d_err = np.concatenate([d_u[:, :2, :], d_theta[:, None, :]], axis=1)  # (K, 3, 12)
            d_res = np.einsum("kab,kbc->kac", self.ip_white, d_err)
            rows = offset + np.arange(3 * i.size)
            for side, frames in ((0, i), (1, j)):
                add(rows, np.repeat(frames, 3), d_res[:, :, 6 * side:6 * side + 6].reshape(-1, 6))
        offset += self.n_ip

        # --- patches: ρ against the model at |z| and the tilt factor
        self._patch_block(rot, tau, jl, jacobian, blocks, add, offset)
        offset += self.n_pp
        # --- smoothness: second differences of anchor points (world mm)
        c = self.sm_c
        sigma = self.opts["acceleration_mm"]
        coeffs = ((-1, 1.0), (0, -2.0), (1, 1.0))
        pts = {d: np.einsum("kab,pb->kpa", rot[c + d], self.anchors) + tau[c + d][:, None, :]
               for d, _ in coeffs}
        second = sum(w * pts[d] for d, w in coeffs) / sigma  # (C, 3 anchors, 3)
        blocks.append(second.ravel())
        if jacobian:
            rows = offset + np.arange(self.n_sm)
            for d, w in coeffs:
                frames = c + d
                ra = np.einsum("kab,pb->kpa", rot[frames], self.anchors)  # (C, 3 anchors, 3)
                derivs = np.zeros((c.size, 3, 3, 6))  # (C, anchor, component, parameter)
                derivs[..., :3] = -_skew(ra) @ jl[frames][:, None]
                derivs[..., 3:] = np.eye(3)
                add(rows, np.repeat(frames, 9), derivs.reshape(-1, 6) * (w / sigma))
        offset += self.n_sm

        # --- pivot: out-of-plane velocity of the contact point, n_k · (w_{k+1}(c) − w_k(c))
        if self.pivot:
            k = self.pv_k
            sigma = self.opts["pivot_sigma_mm"]
            nk = rot[k][:, :, 2]
            wk = np.einsum("kab,b->ka", rot[k], self.contact) + tau[k]
            wk1 = np.einsum("kab,b->ka", rot[k + 1], self.contact) + tau[k + 1]
            delta = wk1 - wk
            blocks.append(np.einsum("ka,ka->k", nk, delta) / sigma)
            if jacobian:
                rows = offset + np.arange(k.size)
                ak = np.einsum("kab,b->ka", rot[k], self.contact)
                ak1 = np.einsum("kab,b->ka", rot[k + 1], self.contact)
                d_k = np.empty((k.size, 6))
                d_k[:, :3] = np.einsum("ka,kab->kb", np.cross(nk, delta) + np.cross(nk, ak), jl[k])
                d_k[:, 3:] = -nk
                d_k1 = np.empty((k.size, 6))
                d_k1[:, :3] = np.einsum("ka,kab->kb", np.cross(ak1, nk), jl[k + 1])
                d_k1[:, 3:] = nk
                for frames, derivs in ((k, d_k), (k + 1, d_k1)):
                    add(rows, frames, derivs / sigma)
            offset += self.n_pv

        residuals = np.concatenate(blocks)
        if not jacobian:
            return residuals
        rows, cols, vals = (np.concatenate(parts) for parts in (jac_rows, jac_cols, jac_vals))
        return residuals, sparse.csr_matrix((vals, (rows, cols)), shape=(offset, 6 * self.free.size))


def _robust(r, robust, f_scale):
    """Cost and IRLS weights: soft-L1 ``f²·2(√(1 + (r/f)²) − 1)`` where ``robust``, r² elsewhere.

    Only patch correlations get the robust loss (outliers: structure, shadows, model misfit); flow
    and prior residuals stay quadratic, or a poor start would make them look like outliers.
    """
    s = 1.0 + (r[robust] / f_scale) ** 2
    root = np.sqrt(s)
    weight = np.ones_like(r)
    weight[robust] = 1.0 / root
    cost = f_scale**2 * np.sum(2.0 * (root - 1.0)) + np.sum(r[~robust] ** 2)
    return 0.5 * float(cost), weight


def _levenberg_marquardt(problem, x0, *, f_scale, max_iterations, tolerance=1e-4):
    """Robust (IRLS) Levenberg-Marquardt on a sparse Jacobian with dense normal equations.

    The normal matrix JᵀWJ of a window is small (6 per frame) and banded, so a sparse direct solve
    (SuperLU) per step is far cheaper than an iterative trust-region subproblem (scipy's
    least_squares with trf/lsmr took about 1 s per window here), and unlike a dense BLAS Cholesky
    it does not stall when the cores are busy. Returns (x, cost, evaluations, residual count).
    """
    x = x0.copy()
    r, jac = problem.evaluate(x, jacobian=True)
    robust = problem.robust_mask()
    cost, weight = _robust(r, robust, f_scale)
    damping, evaluations = 1e-3, 1
    for _ in range(max_iterations):
        weighted = jac.T.multiply(weight).tocsr()
        normal = (weighted @ jac).tocsc()
        gradient = weighted @ r
        diagonal = sparse.diags(np.maximum(normal.diagonal(), 1e-12))
        improved = False
        while damping < 1e10:
            step = spsolve((normal + damping * diagonal).tocsc(), gradient)
            if not np.all(np.isfinite(step)):
                damping *= 10.0
                continue
            trial = x - step
            cost_new, _ = _robust(problem.evaluate(trial, jacobian=False), robust, f_scale)
            evaluations += 1
            if cost_new < cost:
                improved = True
                break
            damping *= 4.0
        if not improved:
            break
        converged = cost - cost_new < tolerance * cost
        x, cost = trial, cost_new
        damping = max(damping / 3.0, 1e-9)
        if converged:
            break
        r, jac = problem.evaluate(x, jacobian=True)
        evaluations += 1
        _, weight = _robust(r, robust, f_scale)
    return x, cost, evaluations, robust.size


def _bundle_adjust(meas, poses, opts, pivot, progress):
    """Sliding-window adjustment of all poses (frame 0 fixed); returns poses (N, 4, 4) and a summary."""
    n = poses.shape[0]
    params = _params_from_poses(poses)
    window, overlap = int(opts["window"]), int(opts["overlap"])
    step = max(window - overlap, 1)
    max_stride = int(opts["ba_max_stride"])
    cost, evaluations, residual_count = 0.0, 0, 0
    starts = list(range(1, n, step))
    bar = progress_bar(total=len(starts), desc="adjust", unit="window", enabled=progress)
    with bar:
        for start in starts:
            stop = min(start + window, n)
            free = np.arange(start, stop)
            pi, pj = meas.pairs[:, 0], meas.pairs[:, 1]
            rows = np.nonzero((pj >= start) & (pj < stop) & (pi >= max(start - max_stride, 0))
                              & (pj - pi <= max_stride))[0]
            theta = meas.inplane_between(pi[rows], pj[rows])[:, 2]
            problem = _Window(meas, params, free, opts, pivot, rows, theta)
            x, window_cost, count, size = _levenberg_marquardt(
                problem, params[free].ravel(), f_scale=opts["f_scale"],
                max_iterations=int(opts["max_iterations"]))
            params[free] = x.reshape(-1, 6)  # the overlap is re-optimised by the next window
            cost += window_cost
            evaluations += count
            residual_count += size
            bar.update(1)
    return matrices_from_params(params), {"windows": len(starts), "cost": cost, "evaluations": evaluations,
                                          "residuals": residual_count}


# --------------------------------------------------------------------------- entry point


def _check_options(options):
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise DataError(f"unknown option '{unknown[0]}' (known: {', '.join(DEFAULT_OPTIONS)})")
    opts = dict(DEFAULT_OPTIONS, **options)
    if opts["first_direction"] not in (1, -1, None):
        raise DataError(f"expected first_direction +1, -1 or None, got {opts['first_direction']!r}")
    for name in ("stops", "slide", "level_sweeps"):
        if not isinstance(opts[name], (bool, np.bool_)):
            raise DataError(f"expected {name} True or False, got {opts[name]!r}")
    if opts["pivot"] not in (True, False, "auto"):
        raise DataError(f"expected pivot True, False or 'auto', got {opts['pivot']!r}")
    strides = tuple(int(s) for s in opts["strides"])
    if not strides or min(strides) < 1 or 1 not in strides:
        raise DataError(f"expected positive strides including 1, got {opts['strides']!r}")
    if int(opts["window"]) < 2 or not 0 <= int(opts["overlap"]) < int(opts["window"]):
        raise DataError(
            f"expected window >= 2 and 0 <= overlap < window, got {opts['window']}, {opts['overlap']}")
    positive = ("patches", "triplet_weight", "pivot_sigma_mm", "acceleration_mm", "inplane_sigma_scale",
                "rho_sigma_floor", "f_scale", "ba_max_stride")
    for name in positive:
        value = opts[name]
        number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
        if not number or not value > 0:
            raise DataError(f"expected a positive number for option {name}, got {value!r}")
    if not 0.0 < float(opts["key_rho"]) < 1.0 or not 0.0 <= float(opts["dark_fraction"]) < 1.0:
        raise DataError(f"expected 0 < key_rho < 1 and 0 <= dark_fraction < 1, got {opts['key_rho']}, "
                        f"{opts['dark_fraction']}")
    if int(opts["max_iterations"]) < 0:
        raise DataError(f"expected max_iterations >= 0, got {opts['max_iterations']}")
    for name in ("flow_downsample", "flow_grid_px"):
        if opts[name] is not None and int(opts[name]) < 1:
            raise DataError(f"expected {name} None or >= 1, got {opts[name]!r}")
    return opts


def _plane_costs(rho, theta, planes, meas, opts):
    """(M,) robust ρ cost of each pair's plane (:func:`triplet_costs`)."""
    x, y = meas.grid.x_mm, meas.grid.y_mm
    design = np.stack([np.ones_like(x), x, y], axis=1)
    tilt = _tilt_per_patch(planes, theta, meas)
    return np.array([triplet_costs((planes[k] @ design.T)[None], rho[k], depth_mm=y, model=meas.model,
                                   rotation_rad=theta[k], tilt_rad=tilt[k:k + 1], f_scale=opts["f_scale"],
                                   rho_sigma_floor=opts["rho_sigma_floor"])[0] for k in range(planes.shape[0])])


def _decide_pivot(meas, rho, theta, free, opts):
    """Fixed-contact scan? Returns (pivot, planes, covariance, median cost increase of the pivot fits).

    The key steps are fitted again with the prior z(contact) ≈ 0 (a key step spans a few frames:
    the contact may move a few frames' worth). On a fixed-contact scan that constraint costs
    nothing, and often finds a better fit than the free one (a fan about the skin and a translation
    explain one noisy pair about equally well); on a sweep it costs clearly more (measured on the
    simulated scans of ``benchmarks/accuracy.py``: median increase −1.97 to −0.33 on the five
    240×320 rotation scans, +1.23 to +2.04 on the fifteen sweeps).
    """
    planes, covariance = free
    pivot_planes, pivot_covariance = fit_planes(rho, theta, meas, pivot_sigma_mm=opts["pivot_sigma_mm"] * 4,
                                                f_scale=opts["f_scale"], rho_sigma_floor=opts["rho_sigma_floor"])
    deep = np.array([1.0, meas.grid.x_mm.mean(), meas.grid.y_mm.max()])
    moving = np.abs(planes @ deep) > 0.2 * np.median(np.abs(planes @ deep))
    increase = 0.0
    if moving.any():
        increase = float(np.median(_plane_costs(rho[moving], theta[moving], pivot_planes[moving], meas, opts)
                                   - _plane_costs(rho[moving], theta[moving], planes[moving], meas, opts)))
    setting = opts["pivot"]
    decided = increase < 0.5 if setting == "auto" else bool(setting)
    if decided:
        return True, pivot_planes, pivot_covariance, increase
    return False, planes, covariance, increase


def estimate_trajectory(frames, *, spacing_mm, model, mask=None, threads=None, progress=False, **options):
    """Estimate where every frame of a freehand scan lies relative to the first, from the images.

    Parameters
    ----------
    frames : (N, H, W) uint8 ndarray
        The scan, N >= 2 (any H, W).
    spacing_mm : (float, float)
        (sx, sy), mm per pixel along columns and rows.
    model : DecorrelationModel
        Decorrelation curves for these images.
    mask : (H, W) bool ndarray, optional
        Imaged region (default: :func:`speckle_rec.inplane.fan_mask_from_frames`).
    threads : int, optional
        Threads for OpenCV, Numba and the flow pool (default: all cores).
    progress : bool
        Progress bars on stderr.
    **options
        Method settings, see ``DEFAULT_OPTIONS`` (strides, patches, flow_downsample, key_rho,
        triplet_weight, slide, level_sweeps, pivot, pivot_sigma_mm, acceleration_mm,
        inplane_sigma_scale, rho_sigma_floor, f_scale, window, overlap, max_iterations,
        first_direction).

    Returns
    -------
    TrajectoryResult

    Raises
    ------
    DataError
        On frames that are not uint8 (N, H, W) with N >= 2, a bad spacing, mask, model or option.
    """
    frames = check_frames(frames)
    if frames.shape[0] < 2:
        raise DataError(f"expected at least 2 frames, got {frames.shape[0]}")
    spacing = check_spacing(spacing_mm)
    if not isinstance(model, DecorrelationModel):
        raise DataError(f"expected a DecorrelationModel, got {type(model).__name__}")
    opts = _check_options(options)
    threads = set_threads(threads)
    clock = time.perf_counter()
    mask = fan_mask_from_frames(frames) if mask is None else check_mask(mask, frames.shape[1:])
    meas = _measure(frames, mask, spacing, model, opts, threads, progress)
    return _estimate(meas, opts, progress, {"measure": time.perf_counter() - clock}, threads=threads)


def _estimate(meas, opts, progress, seconds, *, threads=1, sign_oracle=None):
    """Stages 2-5 on measurements (real, or synthetic in tests), ``threads`` for the slide flows.

    ``sign_oracle(keys, planes) -> signs`` replaces the sign stage's key-step signs, and the
    diagnostics describe those (measuring with the truth: ``benchmarks/trajectory_options.py
    --start oracle-signs``).
    """
    clock = time.perf_counter()
    keys, step_rho, step_theta = _key_steps(meas, opts["key_rho"])
    free = fit_planes(step_rho, step_theta, meas, f_scale=opts["f_scale"], rho_sigma_floor=opts["rho_sigma_floor"])
    pivot, planes, covariance, pivot_cost = _decide_pivot(meas, step_rho, step_theta, free, opts)
    signs, sign_info = _resolve_key_signs(meas, keys, planes, covariance, opts, threads, pivot=pivot,
                                          sign_oracle=sign_oracle)
    seconds["signs"] = time.perf_counter() - clock

    clock = time.perf_counter()
    if pivot or not opts["level_sweeps"]:
        level_info = {"skipped": "fixed skin contact" if pivot else "level_sweeps=False"}
    else:
        meas, planes, level_info = _level_sweep(meas, step_rho, step_theta, planes, signs, opts)
    seconds["level"] = time.perf_counter() - clock

    clock = time.perf_counter()
    poses = _initial_poses(meas, keys, planes, signs)
    seconds["initialise"] = time.perf_counter() - clock

    clock = time.perf_counter()
    poses, ba_info = _bundle_adjust(meas, poses, opts, pivot, progress)
    seconds["adjust"] = time.perf_counter() - clock

    frame_to_first = poses[1:]
    points = np.stack([meas.grid.x_mm, meas.grid.y_mm], axis=1)
    found = _first_direction(frame_to_first, points)
    mirrored = opts["first_direction"] is not None and found != 0 and found != opts["first_direction"]
    if mirrored:
        frame_to_first = mirror(frame_to_first)
    frame_to_previous = locals_from_globals(frame_to_first)
    diagnostics = {
        "frames": int(poses.shape[0]),
        "pairs": int(meas.pairs.shape[0]),
        "patches": int(len(meas.grid)),
        "flow_failures": int(np.sum(~meas.inplane_ok)),
        "pivot": bool(pivot),
        "pivot_cost_increase": round(pivot_cost, 3),
        "signs": dict(sign_info, mirrored=bool(mirrored), first_direction=opts["first_direction"]),
        "level": level_info,
        "bundle_adjustment": ba_info,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "key_frames": keys.tolist(),
        "key_signs": signs.tolist(),
    }
    return TrajectoryResult(frame_to_first, frame_to_previous, diagnostics)


__all__ = ["DEFAULT_OPTIONS", "TrajectoryResult", "estimate_trajectory", "fit_planes"]
