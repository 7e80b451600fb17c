"""Out-of-plane motion from speckle decorrelation: patch grid, patch NCC, stride choice, |plane| fit.

Conventions (contract §3; see :mod:`speckle_rec.inplane`): a pair ``(i, j)`` measures
``T_{i←j}``, the image-mm transform mapping frame ``j`` coordinates into frame ``i`` coordinates
(``(i − 1, i)`` gives the contract's L_i). Patches sit on a grid in frame ``i``; each is
correlated with frame ``j`` sampled at the in-plane-compensated positions ``T_{i←j}⁻¹ (x, y)``.

Frame ``j``'s plane, written in frame ``i``'s image-mm coordinates, is ``z = tz + a·x + b·y``
(``tz`` mm at the image-mm origin, slopes ``a = ∂z/∂x``, ``b = ∂z/∂y``); the patch at (x, y)
measures ``|tz + a·x + b·y|``. With the in-plane motion (tx, ty, θ) the full transform is
``T_{i←j} = [R | t]`` with ``R = Rz(θ) · Rx(α) · Ry(β)`` and ``t = (tx, ty, tz + a·tx + b·ty)``,
where ``Rx(α)`` rotates about the image x axis (α > 0 tilts +y towards +z: b ≈ tan α) and ``Ry(β)``
about the image y axis (β > 0 tilts +x towards −z: a ≈ −tan β); see :func:`pair_transform`.
The in-plane projection of this R equals Rz(θ) up to second order in α, β.
"""

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy.optimize import least_squares
from scipy.spatial.transform import Rotation

from ._patch_kernels import patch_ncc_kernel
from .decorrelation import DecorrelationModel
from .errors import DataError
from .inplane import InplaneMotion, track_grid, check_frames, check_image, check_mask, check_spacing, track_points
from .threads import opencv_threads, set_threads

_PIVOT_START_DEG = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # tilts of the start planes through a pivot
# retry_window_px (e.g. 21) re-tracks pairs whose flow keeps < retry_below of the points with larger windows:
# much better on pairs decorrelated over most of the fan (2° fans: 0.05 instead of 0.3 mm), but off by
# default: it costs +50 % CPU on the strides 1-4 of the rotation protocol, and such pairs are mostly the
# ones choose_strides measures on the way and then discards
_DEFAULT_INPLANE = {"grid_px": 20, "window_px": 13, "levels": 3, "ransac_threshold_mm": 0.3, "retry_window_px": None,
                    "retry_below": 0.5}


@dataclass(frozen=True)
class PatchGrid:
    """Patches (all the same size) inside the imaged region.

    Attributes
    ----------
    rows, cols : (P,) int64 ndarray
        Top-left pixel (0-based row, column) of each patch.
    height_px, width_px : int
        Patch size in pixels.
    x_mm, y_mm : (P,) float64 ndarray
        Patch centres in image-mm (1-based pixel convention: x = sx·(column + 1)).
    spacing_mm : (float, float)
        (sx, sy) the grid was built with.
    """

    rows: np.ndarray
    cols: np.ndarray
    height_px: int
    width_px: int
    x_mm: np.ndarray
    y_mm: np.ndarray
    spacing_mm: tuple

    def __len__(self):
        return int(self.rows.size)


def patch_grid(mask, *, spacing_mm, patch_mm=(4.0, 4.0), step_mm=None, margin_mm=1.0):
    """A regular grid of patches lying (with a margin) inside ``mask``.

    Parameters
    ----------
    mask : (H, W) bool
        Imaged region.
    spacing_mm : (float, float)
        (sx, sy), mm per pixel.
    patch_mm : (float, float)
        Patch (width along x, height along y), mm; rounded to whole pixels.
    step_mm : (float, float), optional
        Distance between patch origins (x, y); default ``patch_mm`` (non-overlapping tiles).
    margin_mm : float
        Every patch, grown by this margin, lies inside ``mask`` (room for in-plane motion).

    Returns
    -------
    PatchGrid

    Raises
    ------
    DataError
        On a bad mask or sizes, or when no patch fits.
    """
    mask = check_mask(mask)
    sx, sy = check_spacing(spacing_mm)
    pw_mm, ph_mm = (float(v) for v in patch_mm)
    sw_mm, sh_mm = (pw_mm, ph_mm) if step_mm is None else (float(v) for v in step_mm)
    if min(pw_mm, ph_mm, sw_mm, sh_mm) <= 0 or margin_mm < 0:
        raise DataError(
            f"expected positive patch_mm and step_mm and margin_mm >= 0, got {patch_mm}, {step_mm}, {margin_mm}")
    width, height = max(2, round(pw_mm / sx)), max(2, round(ph_mm / sy))
    step_c, step_r = max(1, round(sw_mm / sx)), max(1, round(sh_mm / sy))
    mx, my = int(math.ceil(margin_mm / sx)), int(math.ceil(margin_mm / sy))
    # a patch grown by the margin is inside the mask iff it contains no outside pixel (integral image)
    outside = np.pad((~mask).astype(np.int64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    rr, cc = np.nonzero(mask)
    r_first, r_last = rr.min() + my, rr.max() - my - height + 1
    c_first, c_last = cc.min() + mx, cc.max() - mx - width + 1
    if r_last < r_first or c_last < c_first:
        raise DataError(f"no {pw_mm:g} x {ph_mm:g} mm patch fits inside the mask")
    # centre the lattice in the mask's bounding box
    r0 = r_first + ((r_last - r_first) % step_r) // 2
    c0 = c_first + ((c_last - c_first) % step_c) // 2
    rows, cols = np.meshgrid(np.arange(r0, r_last + 1, step_r), np.arange(c0, c_last + 1, step_c), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    top, left = rows - my, cols - mx
    bottom, right = rows + height + my, cols + width + mx
    bad = outside[bottom, right] - outside[top, right] - outside[bottom, left] + outside[top, left]
    keep = bad == 0
    if not keep.any():
        raise DataError(f"no {pw_mm:g} x {ph_mm:g} mm patch fits inside the mask")
    rows, cols = rows[keep].astype(np.int64), cols[keep].astype(np.int64)
    x_mm = sx * (cols + (width - 1) / 2.0 + 1.0)
    y_mm = sy * (rows + (height - 1) / 2.0 + 1.0)
    return PatchGrid(rows, cols, int(height), int(width), x_mm, y_mm, (sx, sy))


def fan_apex_mm(mask, *, spacing_mm, min_half_angle_rad=0.05):
    """Image-mm (x, y) of the apex of a sector (curvilinear) fan, from the straight sides of ``mask``.

    The outermost mask pixel of every row in the upper 15-60 % of the fan's height is taken as a
    point of the left or right side; a robust line (``cv2.fitLine``, Huber) through each side is
    intersected. Beams leave the apex radially, so the beam angle at (x, y) is
    ``atan2(x − apex_x, y − apex_y)``.

    Parameters
    ----------
    mask : (H, W) bool
        Imaged region.
    spacing_mm : (float, float)
        (sx, sy), mm per pixel.
    min_half_angle_rad : float
        Sides closer to parallel than this (a linear probe) give None.

    Returns
    -------
    (float, float) or None
    """
    mask = check_mask(mask)
    sx, sy = check_spacing(spacing_mm)
    rows = np.nonzero(mask.any(axis=1))[0]
    top, bottom = rows.min(), rows.max()
    band = rows[(rows >= top + 0.15 * (bottom - top)) & (rows <= top + 0.6 * (bottom - top))]
    if band.size < 4:
        return None
    left = np.argmax(mask[band], axis=1)
    right = mask.shape[1] - 1 - np.argmax(mask[band, ::-1], axis=1)
    lines = []
    for cols in (left, right):
        points = np.stack([sx * (cols + 1.0), sy * (band + 1.0)], axis=1).astype(np.float32)
        vx, vy, x0, y0 = cv2.fitLine(points, cv2.DIST_HUBER, 0, 0.01, 0.01).ravel()
        lines.append((np.array([x0, y0], float), np.array([vx, vy], float)))
    (p1, d1), (p2, d2) = lines
    cross = d1[0] * d2[1] - d1[1] * d2[0]
    if abs(cross) < math.sin(2 * min_half_angle_rad):
        return None
    t = ((p2[0] - p1[0]) * d2[1] - (p2[1] - p1[1]) * d2[0]) / cross
    apex = p1 + t * d1
    return float(apex[0]), float(apex[1])


def fan_contact_mm(mask, *, spacing_mm, apex_mm=None):
    """Image-mm (x, y) of the middle of the fan's top edge: where the probe face touches the skin.

    The column is the apex's (``apex_mm``, e.g. from :func:`fan_apex_mm`) or, without one, the middle
    of the mask's top row; the row is the first mask pixel in that column. Used as the pivot of
    fixed-contact fanning and rocking (a start of the plane fit, :func:`fit_plane_rho`).

    Parameters
    ----------
    mask : (H, W) bool
        Imaged region.
    spacing_mm : (float, float)
        (sx, sy), mm per pixel.
    apex_mm : (float, float), optional
        Apex of a sector fan.

    Returns
    -------
    (float, float)
    """
    mask = check_mask(mask)
    sx, sy = check_spacing(spacing_mm)
    if apex_mm is None:
        top = np.nonzero(mask.any(axis=1))[0][0]
        column = int(np.round(np.nonzero(mask[top])[0].mean()))
    else:
        column = int(np.clip(np.round(float(apex_mm[0]) / sx - 1.0), 0, mask.shape[1] - 1))
    rows = np.nonzero(mask[:, column])[0]
    if rows.size == 0:  # the apex column misses the mask (an odd fan): fall back on its top row
        return fan_contact_mm(mask, spacing_mm=(sx, sy))
    return sx * (column + 1.0), sy * (rows[0] + 1.0)


def _pixel_affine(motion, spacing):
    """(2, 3) map from fixed-frame 0-based (column, row) to moving-frame 0-based (column, row)."""
    sx, sy = spacing
    to_mm = np.array([[sx, 0.0, sx], [0.0, sy, sy], [0.0, 0.0, 1.0]])
    to_px = np.array([[1.0 / sx, 0.0, -1.0], [0.0, 1.0 / sy, -1.0], [0.0, 0.0, 1.0]])
    return (to_px @ np.linalg.inv(motion.matrix) @ to_mm)[:2]


def _ncc(stack, pairs, affines, mask, grid):
    """(rho, fixed patch mean), each (M, P), for row pairs of ``stack`` and pixel affines (M, 2, 3)."""
    rho = np.empty((len(pairs), len(grid)))
    mean = np.empty_like(rho)
    index = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    patch_ncc_kernel(stack, np.ascontiguousarray(index[:, 0]), np.ascontiguousarray(index[:, 1]),
                     np.ascontiguousarray(affines, dtype=np.float64), mask, grid.rows, grid.cols,
                     grid.height_px, grid.width_px, rho, mean)
    return rho, mean


def _smooth(image, smooth_px):
    if smooth_px <= 0:
        return image
    return cv2.GaussianBlur(image, (0, 0), smooth_px, borderType=cv2.BORDER_REPLICATE)


def patch_correlation(fixed, moving, grid, *, mask, motion=None, smooth_px=0.0, threads=None):
    """NCC of every patch of ``grid`` between two frames, after in-plane compensation.

    Parameters
    ----------
    fixed, moving : (H, W) uint8
    grid : PatchGrid
        Patches in the fixed frame.
    mask : (H, W) bool
        Imaged region; a patch whose compensated samples leave it gets NaN.
    motion : InplaneMotion, optional
        ``T_{fixed←moving}`` (from :func:`speckle_rec.inplane.estimate_inplane`); identity if None.
    smooth_px : float
        σ (pixels) of a Gaussian applied to both frames first (0: none).
    threads : int, optional
        Numba thread count (default: all cores).

    Returns
    -------
    rho : (P,) float64
        Pearson correlation per patch; NaN where undefined.
    """
    fixed = check_image(fixed, name="fixed")
    moving = check_image(moving, name="moving")
    if fixed.shape != moving.shape:
        raise DataError(f"expected frames of equal shape, got {fixed.shape} and {moving.shape}")
    mask = check_mask(mask, fixed.shape)
    motion = InplaneMotion(0.0, 0.0, 0.0, np.zeros((3, 3)), 0.0, 1.0, 0) if motion is None else motion
    if not motion.ok:
        return np.full(len(grid), np.nan)
    set_threads(threads)
    affine = _pixel_affine(motion, grid.spacing_mm)[None]
    stack = np.stack([_smooth(fixed, smooth_px), _smooth(moving, smooth_px)])
    return _ncc(stack, [(0, 1)], affine, mask, grid)[0][0]


@dataclass(frozen=True)
class PairMeasurement:
    """Everything measured on one frame pair ``(i, j)``: in-plane motion and per-patch |distance|.

    Attributes
    ----------
    i, j : int
        Fixed and moving frame; the measurement is of ``T_{i←j}``.
    inplane : InplaneMotion
        In-plane part of ``T_{i←j}`` with covariance.
    x_mm, y_mm : (P,) ndarray
        Patch centres in frame ``i`` image-mm.
    rho : (P,) ndarray
        Patch correlations (NaN where undefined).
    bright : (P,) bool ndarray
        Patches bright enough to hold speckle (not anechoic or shadowed); only these get distances.
    distance_mm, distance_sigma_mm : (P,) ndarray
        |elevational distance| of frame ``j``'s plane from frame ``i``'s at each patch and its
        standard deviation, ignoring the tilt factor (the tilt is unknown before the plane fit);
        NaN where ρ is outside the model's usable band or the patch is dark.
    model : DecorrelationModel
        The curves the distances came from.
    apex_mm : (float, float) or None
        Apex of the fan (beam geometry for the tilt factor), see :func:`fan_apex_mm`.
    pivot_mm : (float, float) or None
        Skin contact (:func:`fan_contact_mm`): the plane fit also starts from planes through it.
    """

    i: int
    j: int
    inplane: InplaneMotion
    x_mm: np.ndarray = field(repr=False)
    y_mm: np.ndarray = field(repr=False)
    rho: np.ndarray = field(repr=False)
    bright: np.ndarray = field(repr=False)
    distance_mm: np.ndarray = field(repr=False)
    distance_sigma_mm: np.ndarray = field(repr=False)
    model: DecorrelationModel = field(repr=False)
    apex_mm: tuple = None
    pivot_mm: tuple = None

    @property
    def valid(self):
        """(P,) bool: patches with a usable distance."""
        return np.isfinite(self.distance_mm)

    def fit_plane(self, *, method="rho", **options):
        """Fit frame ``j``'s plane to this pair's patches.

        ``method="rho"`` (default): :func:`fit_plane_rho` on all bright patches with a finite ρ (no
        censoring bias), with starts through :attr:`pivot_mm` (``pivot_mm=None`` turns them off).
        ``method="distance"``: :func:`fit_plane_abs` on the valid distances, weighted by 1/σ².
        ``options`` are passed on.

        Raises
        ------
        DataError
            If the in-plane motion failed or too few patches are usable.
        """
        if not self.inplane.ok:
            raise DataError(f"in-plane motion of pair ({self.i}, {self.j}) failed; no plane to fit")
        if method == "rho":
            use = self.bright & np.isfinite(self.rho)
            options.setdefault("pivot_mm", self.pivot_mm)
            return fit_plane_rho(self.x_mm[use], self.y_mm[use], self.rho[use], model=self.model,
                                 rotation_rad=self.inplane.theta_rad, apex_mm=self.apex_mm, **options)
        if method == "distance":
            v = self.valid
            return fit_plane_abs(self.x_mm[v], self.y_mm[v], self.distance_mm[v],
                                 1.0 / self.distance_sigma_mm[v] ** 2, **options)
        raise DataError(f"expected method 'rho' or 'distance', got {method!r}")


class _Workspace:
    """Validated inputs of a scan, with smoothed copies (for the correlations) of the frames pairs touch."""

    def __init__(self, frames, mask, spacing_mm, model, grid, patch_mm, inplane_options, dark_fraction, apex_mm):
        self.frames = check_frames(frames)
        self.mask = check_mask(mask, self.frames.shape[1:])
        self.spacing = check_spacing(spacing_mm)
        self.model = DecorrelationModel.default() if model is None else model
        if not isinstance(self.model, DecorrelationModel):
            raise DataError(f"expected a DecorrelationModel, got {type(self.model).__name__}")
        self.grid = grid if grid is not None else patch_grid(
            self.mask, spacing_mm=self.spacing, patch_mm=self.model.patch_mm if patch_mm is None else patch_mm)
        options = dict(_DEFAULT_INPLANE)
        unknown = set(inplane_options or {}) - set(options)
        if unknown:
            raise DataError(f"unknown inplane option '{sorted(unknown)[0]}' (known: {', '.join(options)})")
        options.update(inplane_options or {})
        self.options = options
        if not 0.0 <= dark_fraction < 1.0:
            raise DataError(f"expected 0 <= dark_fraction < 1, got {dark_fraction}")
        self.dark_fraction = float(dark_fraction)
        self.points = track_points(self.mask, grid_px=options["grid_px"], window_px=options["window_px"])
        retry = options["retry_window_px"]
        self.retry_points = None if retry is None else track_points(self.mask, grid_px=options["grid_px"],
                                                                    window_px=int(retry))
        self.apex = fan_apex_mm(self.mask, spacing_mm=self.spacing) if apex_mm is None else tuple(map(float, apex_mm))
        self.pivot = fan_contact_mm(self.mask, spacing_mm=self.spacing, apex_mm=self.apex)
        self.stack = np.empty((0,) + self.frames.shape[1:], np.uint8)
        self.row = np.full(self.frames.shape[0], -1, np.int64)

    def load(self, indices):
        """Smooth the frames in ``indices`` not smoothed yet (once per frame)."""
        new = np.setdiff1d(np.asarray(indices, dtype=np.int64), np.nonzero(self.row >= 0)[0])
        if new.size:
            smoothed = np.stack([_smooth(self.frames[k], self.model.smooth_px) for k in new])
            self.row[new] = self.stack.shape[0] + np.arange(new.size)
            self.stack = np.concatenate([self.stack, smoothed]) if self.stack.size else smoothed

    def measure(self, pairs, threads):
        """PairMeasurements of ``pairs`` (list of (i, j)); ``threads`` workers track in parallel."""
        self.load([k for pair in pairs for k in pair])
        opts = self.options

        def track(pair):
            i, j = pair
            return track_grid(self.frames[i], self.frames[j], self.points, self.mask, self.spacing,
                              window_px=opts["window_px"], levels=opts["levels"],
                              ransac_threshold_mm=opts["ransac_threshold_mm"],
                              retry_window_px=opts["retry_window_px"], retry_points=self.retry_points,
                              retry_below=opts["retry_below"])

        if threads > 1 and len(pairs) > 1:
            # one OpenCV thread per worker: LK on a few hundred points parallelises poorly inside
            with opencv_threads(1), ThreadPoolExecutor(threads) as pool:
                motions = list(pool.map(track, pairs))
        else:
            motions = [track(pair) for pair in pairs]
        ok = np.array([m.ok for m in motions], bool)
        grid = self.grid
        rho = np.full((len(pairs), len(grid)), np.nan)
        bright = np.zeros(rho.shape, bool)
        if ok.any():
            rows = [(self.row[i], self.row[j]) for (i, j), good in zip(pairs, ok) if good]
            affines = np.stack([_pixel_affine(m, self.spacing) for m, good in zip(motions, ok) if good])
            rho[ok], mean = _ncc(self.stack, rows, affines, self.mask, grid)
            bright[ok] = mean >= self.dark_fraction * np.median(mean, axis=1, keepdims=True)
        theta = np.array([m.theta_rad if m.ok else 0.0 for m in motions])[:, None]
        dist, sigma = self.model.distance(np.where(bright, rho, np.nan), grid.y_mm[None, :], theta)
        return [
            PairMeasurement(int(i), int(j), motions[k], grid.x_mm, grid.y_mm, rho[k], bright[k], dist[k], sigma[k],
                            self.model, self.apex, self.pivot)
            for k, (i, j) in enumerate(pairs)
        ]


def _check_pairs(pairs, n):
    index = np.asarray(pairs, dtype=np.int64).reshape(-1, 2) if len(pairs) else np.empty((0, 2), np.int64)
    bad = (index < 0) | (index >= n)
    if bad.any():
        raise DataError(f"frame index {int(index[bad][0])} out of range for {n} frames")
    return [tuple(p) for p in index.tolist()]


def measure_pairs(frames, pairs, *, mask, spacing_mm, model=None, grid=None, patch_mm=None,
                  inplane_options=None, dark_fraction=0.6, apex_mm=None, threads=None):
    """In-plane motion and per-patch |elevational distance| for many frame pairs.

    LK flow runs on the frames pair by pair (``threads`` pairs at a time); then the patch
    correlations of all pairs are computed on the frames smoothed by the model's ``smooth_px`` (once
    each) in one parallel Numba call, and inverted with the model (corrected for each pair's in-plane
    rotation).

    Parameters
    ----------
    frames : (n, H, W) uint8
        The scan.
    pairs : sequence of (i, j)
        Frame index pairs; each measures ``T_{i←j}``.
    mask : (H, W) bool
        Imaged region.
    spacing_mm : (float, float)
        (sx, sy), mm per pixel.
    model : DecorrelationModel, optional
        Default: :meth:`DecorrelationModel.default`.
    grid : PatchGrid, optional
        Default: :func:`patch_grid` with ``patch_mm`` (default: the model's ``patch_mm``).
    patch_mm : (float, float), optional
        Patch size when ``grid`` is not given.
    inplane_options : dict, optional
        ``grid_px``, ``window_px``, ``levels``, ``ransac_threshold_mm``, ``retry_window_px`` (default
        None: no retry; 21 makes pairs decorrelated over most of the fan much more accurate, at 2.6x
        the flow time for the pairs retried) and ``retry_below`` of the flow (see
        :func:`speckle_rec.inplane.estimate_inplane`).
    dark_fraction : float
        A patch is dark (anechoic, shadow: no speckle to decorrelate) when its mean is below this
        fraction of the pair's median patch mean; dark patches get no distance.
    apex_mm : (float, float), optional
        Fan apex in image-mm (beam directions for the tilt factor); default :func:`fan_apex_mm` of
        ``mask``.
    threads : int, optional
        OpenCV / Numba threads (default: all cores).

    Returns
    -------
    list of PairMeasurement
        In the order of ``pairs``.
    """
    work = _Workspace(frames, mask, spacing_mm, model, grid, patch_mm, inplane_options, dark_fraction, apex_mm)
    pairs = _check_pairs(pairs, work.frames.shape[0])
    return work.measure(pairs, set_threads(threads))


def measure_pair(frames, i, j, **options):
    """:func:`measure_pairs` for the single pair ``(i, j)``; returns one :class:`PairMeasurement`."""
    return measure_pairs(frames, [(i, j)], **options)[0]


@dataclass(frozen=True)
class StridePlan:
    """Frame strides chosen so that patch correlations land in the model's usable band.

    Attributes
    ----------
    starts : (m,) int ndarray
        First frame ``i`` of each pair ``(i, i + stride)``.
    strides : (S,) int ndarray
        Strides tried, increasing.
    region_edges_mm : (R + 1,) ndarray
        Depth regions (image-mm y) the choice is made for (the model's bands).
    median_rho : (m, S, R) ndarray
        Median rotation-corrected correlation ρ / R(θ) of the bright patches per start, stride and
        region; NaN where not measured.
    chosen : (m, R) int ndarray
        Chosen stride per start and region (the one whose median ρ, inside the usable band, is
        closest to the target), 0 where no stride was usable.
    measurements : dict
        ``{(i, j): PairMeasurement}`` of every pair measured on the way (reuse them).
    """

    starts: np.ndarray
    strides: np.ndarray
    region_edges_mm: np.ndarray
    median_rho: np.ndarray = field(repr=False)
    chosen: np.ndarray
    measurements: dict = field(repr=False)

    def step_distances(self, *, patches="all", **fit_options):
        """|Elevational step| per frame, per start and depth region, measured at the chosen strides.

        For start ``i`` and region ``r`` with chosen stride ``k`` (the one whose median ρ there is in
        the model's usable band), frame ``i + k``'s plane is fitted in ρ space (:func:`fit_plane_rho`,
        once per pair), and ``|z|`` at the centroid of region ``r``'s bright patches divided by ``k``
        is the step: a small per-frame motion is measured over ``k`` frames, where one step would
        leave ρ ≈ 1 (the per-step value is the mean step over those frames).

        Parameters
        ----------
        patches : {"all", "in_band"}
            The plane is fitted to all bright patches of the pair (default), or only to those of the
            regions whose median ρ at that stride is in the usable band. Measured (bench_motion.py):
            the same on pure translation (per-step error 9.1 vs 9.5 % on fully developed speckle),
            but on the rotation protocol the in-band-only planes, which see a few depth bands, get
            the tilt wrong more often (median / mean error 13.9 / 41.6 % against 11.2 / 22.5 %).
        **fit_options
            Passed to :func:`fit_plane_rho` (default: the measurement's apex and no pivot start:
            these pairs are in the usable band by choice, not decorrelated fans; on the rotation
            protocol a pivot start changed nothing, on pure translation with in-band planes it won a
            few times with a spurious tilt).

        Returns
        -------
        StepDistances
        """
        if patches not in ("all", "in_band"):
            raise DataError(f"expected patches 'all' or 'in_band', got {patches!r}")
        n_regions = self.region_edges_mm.size - 1
        shape = (self.starts.size, n_regions)
        step, x_c, y_c = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan)
        planes = {}
        for a, start in enumerate(self.starts):
            for r in range(n_regions):
                k = int(self.chosen[a, r])
                if k == 0:
                    continue
                m = self.measurements[(int(start), int(start) + k)]
                region = np.clip(np.searchsorted(self.region_edges_mm, m.y_mm, side="right") - 1, 0, n_regions - 1)
                if (m.i, m.j) not in planes:
                    lo, hi = m.model.usable_rho
                    median = self.median_rho[a, int(np.searchsorted(self.strides, k))]
                    with np.errstate(invalid="ignore"):
                        in_band = (median >= lo) & (median <= hi)
                    use = m.bright & np.isfinite(m.rho)
                    if patches == "in_band":
                        use &= in_band[region]
                    options = dict(apex_mm=m.apex_mm)
                    options.update(fit_options)
                    try:
                        planes[(m.i, m.j)] = fit_plane_rho(m.x_mm[use], m.y_mm[use], m.rho[use], model=m.model,
                                                           rotation_rad=m.inplane.theta_rad, **options)
                    except DataError:
                        planes[(m.i, m.j)] = None
                plane = planes[(m.i, m.j)]
                here = (region == r) & m.bright & np.isfinite(m.rho)
                if plane is None or not here.any():
                    continue
                x_c[a, r], y_c[a, r] = m.x_mm[here].mean(), m.y_mm[here].mean()
                step[a, r] = abs(plane.z_mm(x_c[a, r], y_c[a, r])) / k
        return StepDistances(self.starts, self.region_edges_mm, self.chosen.copy(), step, x_c, y_c,
                             {key: value for key, value in planes.items() if value is not None})


@dataclass(frozen=True)
class StepDistances:
    """Per-frame elevational steps measured at the strides a :class:`StridePlan` chose.

    Attributes
    ----------
    starts : (m,) int ndarray
        Start frames.
    region_edges_mm : (R + 1,) ndarray
        Depth regions (image-mm y).
    stride : (m, R) int ndarray
        Stride each value was measured at (0: no stride was usable).
    step_mm : (m, R) ndarray
        |elevational distance| per frame at the region's centroid: the chosen-stride distance
        divided by the stride; NaN where no stride was usable or the fit failed.
    x_mm, y_mm : (m, R) ndarray
        Centroid of the region's bright patches, where ``step_mm`` applies.
    planes : dict
        ``{(i, j): PlaneFit}`` of the pairs used (frame ``j``'s plane in frame ``i``).
    """

    starts: np.ndarray
    region_edges_mm: np.ndarray
    stride: np.ndarray
    step_mm: np.ndarray
    x_mm: np.ndarray = field(repr=False)
    y_mm: np.ndarray = field(repr=False)
    planes: dict = field(repr=False)


def choose_strides(frames, starts=None, *, mask, spacing_mm, model=None, grid=None, patch_mm=None,
                   strides=(1, 2, 4, 8, 16), target_rho=None, inplane_options=None, dark_fraction=0.6,
                   apex_mm=None, threads=None):
    """Choose, per start frame and depth region, the stride whose correlation is best usable.

    Strides are tried in increasing order (all starts at once); a start stops growing once the
    median rotation-corrected ρ of every region has fallen below ``target_rho`` (or the scan ends).

    Parameters
    ----------
    frames : (n, H, W) uint8
    starts : array_like of int, optional
        Start frames (default: every frame but the last).
    mask, spacing_mm, model, grid, patch_mm, inplane_options, dark_fraction, apex_mm, threads
        As in :func:`measure_pairs`.
    strides : sequence of int
        Candidate strides (positive, increasing).
    target_rho : float, optional
        Preferred correlation; default the middle of the model's usable band.

    Returns
    -------
    StridePlan
    """
    work = _Workspace(frames, mask, spacing_mm, model, grid, patch_mm, inplane_options, dark_fraction, apex_mm)
    n = work.frames.shape[0]
    starts = np.arange(n - 1) if starts is None else np.asarray(starts, dtype=np.int64).ravel()
    strides = np.asarray(strides, dtype=np.int64).ravel()
    if strides.size == 0 or np.any(strides < 1) or np.any(np.diff(strides) <= 0):
        raise DataError(f"expected positive increasing strides, got {strides.tolist()}")
    if starts.size and (starts.min() < 0 or starts.max() >= n):
        raise DataError(f"start frame out of range for {n} frames")
    model = work.model
    lo, hi = model.usable_rho
    target = 0.5 * (lo + hi) if target_rho is None else float(target_rho)
    threads = set_threads(threads)
    edges = model.depth_edges_mm
    region = np.clip(np.searchsorted(edges, work.grid.y_mm, side="right") - 1, 0, edges.size - 2)
    median = np.full((starts.size, strides.size, edges.size - 1), np.nan)
    measurements = {}
    active = np.ones(starts.size, bool)
    for s, stride in enumerate(strides):
        active &= starts + stride < n
        todo = np.nonzero(active)[0]
        if todo.size == 0:
            break
        pairs = [(int(starts[k]), int(starts[k] + stride)) for k in todo]
        for k, m in zip(todo, work.measure(pairs, threads)):
            measurements[(m.i, m.j)] = m
            corrected = m.rho / model.scale(m.y_mm, m.inplane.theta_rad)
            for r in range(edges.size - 1):
                values = corrected[(region == r) & m.bright & np.isfinite(corrected)]
                if values.size:
                    median[k, s, r] = np.median(values)
        with np.errstate(invalid="ignore"):
            active[todo] = ~np.all(np.isnan(median[todo, s]) | (median[todo, s] < target), axis=-1)
    with np.errstate(invalid="ignore"):
        usable = (median >= lo) & (median <= hi)
    score = np.where(usable, np.abs(median - target), np.inf)
    best = np.argmin(score, axis=1)
    chosen = np.where(np.isfinite(np.min(score, axis=1)), strides[best], 0)
    return StridePlan(starts, strides, edges, median, chosen, measurements)


@dataclass(frozen=True)
class PlaneFit:
    """Frame ``j``'s plane in frame ``i``'s image-mm coordinates: ``z = tz + a·x + b·y``.

    The global sign is not observable from |distance|; it is fixed so that the plane is at z ≥ 0
    at the (weighted) centroid of the patches used.

    Attributes
    ----------
    tz_mm : float
        Elevational offset at the image-mm origin, mm.
    a, b : float
        Slopes ∂z/∂x and ∂z/∂y (mm/mm).
    covariance : (3, 3) ndarray
        Covariance of (tz_mm, a, b) from the Jacobian at the solution, scaled by the robust
        residual variance when that exceeds the stated per-patch uncertainties.
    residual_rms_mm : float
        RMS of |plane| − distance over the patches used, mm.
    n_used : int
        Number of patches used.
    """

    tz_mm: float
    a: float
    b: float
    covariance: np.ndarray = field(repr=False)
    residual_rms_mm: float
    n_used: int

    @property
    def params(self):
        """(3,) array (tz_mm, a, b)."""
        return np.array([self.tz_mm, self.a, self.b])

    @property
    def sigma(self):
        """(3,) standard deviations of (tz_mm, a, b)."""
        return np.sqrt(np.diag(self.covariance))

    def z_mm(self, x_mm, y_mm):
        """Signed elevation ``tz + a·x + b·y`` of frame ``j``'s plane at frame-``i`` points."""
        return self.tz_mm + self.a * np.asarray(x_mm) + self.b * np.asarray(y_mm)

    def angles(self, theta_rad=0.0):
        """Out-of-plane rotation angles (α about image x, β about image y), radians.

        Exact for ``R = Rz(θ) · Rx(α) · Ry(β)`` (module docstring) given the in-plane angle θ.
        """
        nx, ny = -self.a, -self.b  # plane normal (nx, ny, 1) up to scale
        c, s = math.cos(theta_rad), math.sin(theta_rad)
        wx, wy = c * nx + s * ny, -s * nx + c * ny  # Rz(−θ) · (nx, ny)
        alpha = math.atan(-wy)
        return alpha, math.atan(wx * math.cos(alpha))


def pair_transform(inplane, plane):
    """The rigid ``T_{i←j}`` (4, 4) combining in-plane motion and the plane of frame ``j``.

    Parameters
    ----------
    inplane : InplaneMotion
        (tx, ty, θ) of ``T_{i←j}``.
    plane : PlaneFit
        Frame ``j``'s plane ``z = tz + a·x + b·y`` in frame ``i``'s coordinates.

    Returns
    -------
    (4, 4) ndarray
        ``[R | t]`` with ``R = Rz(θ) Rx(α) Ry(β)`` (α, β from :meth:`PlaneFit.angles`) and
        ``t = (tx, ty, tz + a·tx + b·ty)``: frame ``j``'s plane maps exactly onto the fitted plane
        and its origin onto (tx, ty, ·).
    """
    alpha, beta = plane.angles(inplane.theta_rad)
    out = np.eye(4)
    out[:3, :3] = Rotation.from_euler("ZXY", [inplane.theta_rad, alpha, beta]).as_matrix()
    out[:3, 3] = [inplane.tx_mm, inplane.ty_mm, plane.tz_mm + plane.a * inplane.tx_mm + plane.b * inplane.ty_mm]
    return out


def _signed_lsq(xc, yc, d, sw, signs):
    """Weighted least-squares plane through ``signs · d`` (weights ``sw²``); returns (tz_c, a, b)."""
    design = np.stack([np.ones_like(xc), xc, yc], axis=1) * sw[:, None]
    return np.linalg.lstsq(design, signs * d * sw, rcond=None)[0]


def _abs_starts(xc, yc, d, sw, f_scale, splits):
    """Starts for |plane| ≈ d from sign-flip patterns, each refined by re-signing; best first."""
    patterns = [np.ones(d.size)]
    for q in splits:
        patterns.append(np.where(xc < np.quantile(xc, q), -1.0, 1.0))
        patterns.append(np.where(yc < np.quantile(yc, q), -1.0, 1.0))
    found = []
    for signs in patterns:
        p = _signed_lsq(xc, yc, d, sw, signs)
        for _ in range(5):
            new_signs = np.where(p[0] + p[1] * xc + p[2] * yc < 0, -1.0, 1.0)
            if np.array_equal(new_signs, signs):
                break
            signs = new_signs
            p = _signed_lsq(xc, yc, d, sw, signs)
        p = p if p[0] >= 0 else -p  # |plane| is unchanged by a global flip: keep one of each pair
        cost = np.sum(np.minimum((sw * (np.abs(p[0] + p[1] * xc + p[2] * yc) - d)) ** 2, (3 * f_scale) ** 2))
        if not any(np.allclose(p, other, rtol=1e-6, atol=1e-9) for _, other in found):
            found.append((cost, p))
    return [p for _, p in sorted(found, key=lambda item: item[0])]


def _centred(x_mm, y_mm, values, weights, name):
    x = np.asarray(x_mm, dtype=np.float64).ravel()
    y = np.asarray(y_mm, dtype=np.float64).ravel()
    v = np.asarray(values, dtype=np.float64).ravel()
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if not x.size == y.size == v.size == w.size:
        raise DataError(
            f"expected x_mm, y_mm, {name}, weights of equal length, got {x.size}, {y.size}, {v.size}, {w.size}")
    if np.any(w < 0):
        raise DataError("expected non-negative weights")
    keep = np.isfinite(x) & np.isfinite(y) & np.isfinite(v) & np.isfinite(w) & (w > 0)
    if keep.sum() < 3:
        raise DataError(f"expected at least 3 patches with a finite {name}, got {int(keep.sum())}")
    x, y, v, w = x[keep], y[keep], v[keep], w[keep]
    # centred coordinates keep the 3x3 problem well conditioned (the image-mm origin is off-image)
    x0, y0 = np.average(x, weights=w), np.average(y, weights=w)
    return x, y, v, w, x0, y0


def _plane_result(p, jac, residuals, x0, y0, dist_residual):
    """PlaneFit from centred parameters (tz_c, a, b), the Jacobian and residuals at the solution."""
    if p[0] < 0:  # sign convention: plane at z >= 0 at the centroid
        p, jac = -p, -jac
    n = residuals.size
    # residuals are in σ units: inflate the covariance when the data scatter more than stated
    scale2 = max(1.0, (1.4826 * np.median(np.abs(residuals))) ** 2) if n > 3 else 1.0
    cov_c = scale2 * np.linalg.pinv(jac.T @ jac)
    to_origin = np.array([[1.0, -x0, -y0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # tz = tz_c − a·x0 − b·y0
    tz = p[0] - p[1] * x0 - p[2] * y0
    rms = float(np.sqrt(np.mean(dist_residual**2))) if dist_residual.size else np.nan
    return PlaneFit(float(tz), float(p[1]), float(p[2]), to_origin @ cov_c @ to_origin.T, rms, int(n))


def fit_plane_abs(x_mm, y_mm, dist_mm, weights=None, *, loss="soft_l1", f_scale=2.0, splits=(0.25, 0.5, 0.75)):
    """Robust fit of ``|tz + a·x + b·y|`` to per-patch |elevational distances|.

    Starts: plain plane fits of the distances with the sign flipped on one side of several x and y
    splits (a plane crossing the image gives a V in |d|), each iterated by re-signing with the
    current plane; the best is polished by ``scipy.optimize.least_squares`` with a robust loss on
    ``√w · (|plane| − d)``.

    Parameters
    ----------
    x_mm, y_mm : (P,) array_like
        Patch centres in frame ``i`` image-mm.
    dist_mm : (P,) array_like
        Measured |distance| (mm); NaN entries are ignored.
    weights : (P,) array_like, optional
        Inverse variances 1/σ² (1/mm²), e.g. ``1 / distance_sigma_mm**2``; default 1.
    loss : str
        ``least_squares`` loss.
    f_scale : float
        Soft inlier margin of the weighted residuals (in σ units when weights are 1/σ²).
    splits : sequence of float
        Quantiles of x and y at which sign-flip starts are made.

    Returns
    -------
    PlaneFit

    Raises
    ------
    DataError
        On mismatched lengths, negative weights, or fewer than 3 usable patches.
    """
    x, y, d, w, x0, y0 = _centred(x_mm, y_mm, dist_mm, weights, "dist_mm")
    d = np.abs(d)
    xc, yc, sw = x - x0, y - y0, np.sqrt(w)
    design = np.stack([np.ones_like(xc), xc, yc], axis=1)

    def residuals(p):
        return sw * (np.abs(design @ p) - d)

    def jacobian(p):
        return (sw * np.where(design @ p < 0, -1.0, 1.0))[:, None] * design

    start = _abs_starts(xc, yc, d, sw, f_scale, splits)[0]
    p = least_squares(residuals, start, jac=jacobian, loss=loss, f_scale=f_scale).x
    return _plane_result(p, jacobian(p), residuals(p), x0, y0, np.abs(design @ p) - d)


def fit_plane_rho(x_mm, y_mm, rho, *, model, rotation_rad=0.0, apex_mm=None, pivot_mm=None, loss="soft_l1",
                  f_scale=2.0, splits=(0.25, 0.5, 0.75), rho_sigma_floor=0.005):
    """Robust fit of frame ``j``'s plane ``z = tz + a·x + b·y`` to patch correlations directly.

    Every patch contributes ``(ρ − model.rho(|z|, y, θ, α_k)) / σ_ρ`` with ``σ_ρ = s·(1 − ρ_model²)
    + rho_sigma_floor``. The tilt factor sees ``α_k = α·cos φ_k − β·sin φ_k``, the rotation about
    the beam's own lateral axis at the patch's beam angle φ_k (0 without ``apex_mm``), with α, β the
    plane's angles about image x and y (:meth:`PlaneFit.angles`). Patches outside the usable band
    (nearly identical, or decorrelated) thus still constrain the plane instead of being dropped,
    which would bias the result (censoring). Starts come from :func:`fit_plane_abs`-style sign
    patterns on distances inverted from ρ clipped into the usable band; the one with the lowest
    robust cost in ρ is refined by ``scipy.optimize.least_squares`` (robust loss), twice, with σ_ρ
    updated in between.

    Parameters
    ----------
    x_mm, y_mm : (P,) array_like
        Patch centres in frame ``i`` image-mm (``y_mm`` is also the model's depth).
    rho : (P,) array_like
        Measured correlations (bright patches only; NaN entries are ignored).
    model : DecorrelationModel
        The curves ρ was measured for.
    rotation_rad : float
        In-plane rotation θ of the pair.
    apex_mm : (float, float), optional
        Image-mm apex of a sector fan (:func:`fan_apex_mm`); beams are taken as parallel to y if None.
    pivot_mm : (float, float), optional
        A point the plane may pass through, e.g. the skin contact (:func:`fan_contact_mm`). Planes
        through it tilted by 0.25-6° about four axes are scored too, and the best of them is refined
        as well when it scores below the refined distance-based fit; the lower robust cost wins. A
        fan about the contact leaves the deep image decorrelated, where every distance-based start is
        a flat plane (on the forearm, a 2° fan ended in a 5.8° local minimum without it).
    loss, f_scale, splits
        As in :func:`fit_plane_abs`.
    rho_sigma_floor : float
        Added to σ_ρ so that patches at ρ ≈ 1 keep a finite weight.

    Returns
    -------
    PlaneFit
        ``residual_rms_mm`` is computed over the patches whose ρ inverts inside the usable band.
    """
    if not isinstance(model, DecorrelationModel):
        raise DataError(f"expected a DecorrelationModel, got {type(model).__name__}")
    x, y, r, _, x0, y0 = _centred(x_mm, y_mm, rho, None, "rho")
    xc, yc = x - x0, y - y0
    design = np.stack([np.ones_like(xc), xc, yc], axis=1)
    q = model.parameters(y)  # interpolated once: the loops below evaluate the model many times
    cos_t, sin_t = math.cos(rotation_rad), math.sin(rotation_rad)
    if apex_mm is None:
        cos_f, sin_f = np.ones_like(y), np.zeros_like(y)
    else:
        beam = np.arctan2(x - apex_mm[0], y - apex_mm[1])
        cos_f, sin_f = np.cos(beam), np.sin(beam)
    # ∂α_k/∂(tz_c, a, b) with the small-angle α ≈ b·cos θ − a·sin θ, β ≈ −(a·cos θ + b·sin θ)
    dtilt = cos_f[:, None] * np.array([0.0, -sin_t, cos_t]) + sin_f[:, None] * np.array([0.0, cos_t, sin_t])

    def tilt(p):
        """Per-patch rotation about the beam's lateral axis, from the plane's α and β."""
        alpha, beta = PlaneFit(0.0, p[1], p[2], np.zeros((3, 3)), 0.0, 0).angles(rotation_rad)
        return alpha * cos_f - beta * sin_f

    def residuals(p, spread):
        return (r - q.rho(design @ p, rotation_rad, tilt(p))) / spread

    def jacobian(p, spread):
        z, alpha = design @ p, tilt(p)
        jac = (q.rho_slope(z, rotation_rad, alpha) * np.where(z < 0, -1.0, 1.0))[:, None] * design
        # the tilt factor exp(−½ α_k² P) depends on (a, b) through α_k
        jac += (q.rho(z, rotation_rad, alpha) * -alpha * q.tilt_precision)[:, None] * dtilt
        return -jac / spread[:, None]

    def spread_at(p):
        return q.noise * (1.0 - q.rho(design @ p, rotation_rad, tilt(p)) ** 2) + rho_sigma_floor

    def robust_cost(p):
        z2 = (residuals(p, spread_at(p)) / f_scale) ** 2
        return np.sum(2.0 * (np.sqrt(1.0 + z2) - 1.0))  # soft-L1, for ranking the starts

    lo, hi = model.usable_rho
    scale = q.scale(rotation_rad)
    inner = np.clip(r / scale, lo * (1 + 1e-9), hi * (1 - 1e-9))  # every patch gets a start distance
    start_d, _ = model.distance(inner * scale, y, rotation_rad)
    starts = _abs_starts(xc, yc, np.nan_to_num(start_d), np.ones_like(r), f_scale, splits)
    candidates = [min(starts, key=robust_cost)]
    if pivot_mm is not None:
        # planes through the pivot (a fixed skin contact): where most of the fan is decorrelated the
        # distance-based starts are all flat planes far away, and a fan about the contact is missed
        pivot = np.asarray(pivot_mm, dtype=np.float64).ravel()
        if pivot.size != 2 or not np.isfinite(pivot).all():
            raise DataError(f"expected pivot_mm as finite (x, y) image-mm, got {pivot_mm!r}")
        px, py = pivot
        pivot_starts = []
        for angle in np.radians(_PIVOT_START_DEG):
            for direction in np.radians((0.0, 45.0, 90.0, 135.0)):
                a, b = math.tan(angle) * math.cos(direction), math.tan(angle) * math.sin(direction)
                pivot_starts.append(np.array([a * (x0 - px) + b * (y0 - py), a, b]))
        candidates.append(min(pivot_starts, key=robust_cost))
    best = None
    for p in candidates:
        if best is not None and robust_cost(p) >= best[0]:
            continue  # a start already worse than the refined solution: not worth refining (measured)
        # iteratively reweighted: σ_ρ is frozen at the previous plane (letting it follow the
        # parameters would favour low-ρ solutions, whose residuals look smaller)
        for _ in range(2):
            spread = spread_at(p)
            p = least_squares(residuals, p, jac=jacobian, args=(spread,), loss=loss, f_scale=f_scale).x
        cost = robust_cost(p)
        if best is None or cost < best[0]:
            best = (cost, p, spread)
    _, p, spread = best
    inverted, _ = model.distance(r, y, rotation_rad, tilt(p))
    inside = np.isfinite(inverted)
    return _plane_result(p, jacobian(p, spread), residuals(p, spread), x0, y0,
                         np.abs(design[inside] @ p) - inverted[inside])
