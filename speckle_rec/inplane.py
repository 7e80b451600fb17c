"""In-plane (rigid 2D) motion between two frames, from pyramidal Lucas-Kanade flow on speckle.

Convention (contract §3): image-mm coordinates of 1-based pixel (x = column, y = row) are
(sx·x, sy·y); the origin is pixel (0, 0), one pixel outside the top-left corner; z is the image
normal, so with y pointing down a positive rotation about +z turns +x towards +y.

:func:`estimate_inplane` ``(fixed, moving)`` returns the in-plane part of ``T_{fixed←moving}``, the
image-mm transform that maps a point given in the *moving* frame's coordinates to the *fixed*
frame's coordinates::

    q_fixed = R(θ) · q_moving + (tx, ty),      R(θ) = [[cos θ, −sin θ], [sin θ, cos θ]]

(rotation about the image-mm origin, then translation). With ``fixed = frames[i − 1]`` and
``moving = frames[i]`` this is the in-plane part of the contract's ``frame_to_previous`` L_i; the
speckle seen at ``q_moving`` in the moving frame appears at ``q_fixed`` in the fixed frame.

Flow method (measured on synthetic speckle, 480x640, sub-pixel rigid motion, one core): pyramidal
Lucas-Kanade on a 16-pixel grid gave 0.005 mm / 0.004° worst-case error in ~4 ms per pair; DIS
(ultrafast/fast/medium) 0.08/0.12/0.02 mm in 11/17/36 ms; Farneback 0.007 mm in 100 ms (0.02 mm in
22 ms at half resolution). LK on a grid is therefore the default and only method. On rendered
freehand scans (consecutive frames, out-of-plane motion included) a 20-pixel grid gave 0.015 mm /
0.008° (95th percentile) in ~7 ms; LK at half resolution was 2x faster but 2.4x less accurate.
"""

from dataclasses import dataclass, field, replace

import cv2
import numpy as np
from scipy import ndimage

from .errors import DataError
from .threads import set_threads

# LK stops when a point moves < 0.01 px between iterations (well below the 0.05 mm ≈ 0.2 px target).
_LK_CRITERIA = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01)
_MIN_POINTS = 10
_RAYLEIGH_MEDIAN = 1.1774100225154747  # median of ‖r‖ for a 2D isotropic Gaussian residual of unit σ
# Flow errors are spatially correlated (speckle shared by neighbouring windows, out-of-plane motion):
# on simulated frame pairs the errors were ~2x the independent-vector prediction, so variances x 4.
_COVARIANCE_INFLATION = 4.0
_RETRY_MIN_INLIERS = 0.2  # a retry with a larger window is kept only if this fraction of its points agree


def check_frames(frames, *, name="frames"):
    """Validate a uint8 frame stack (n, H, W) and return it as a C-contiguous array."""
    array = np.asarray(frames)
    if array.ndim != 3:
        raise DataError(f"expected {name} of shape (n, H, W), got {array.shape}")
    if array.dtype != np.uint8:
        raise DataError(f"expected uint8 {name}, got {array.dtype}")
    if array.shape[0] < 1 or array.shape[1] < 2 or array.shape[2] < 2:
        raise DataError(f"expected non-empty {name} of shape (n, H, W), got {array.shape}")
    return np.ascontiguousarray(array)


def check_image(image, *, name):
    """Validate one uint8 frame (H, W)."""
    array = np.asarray(image)
    if array.ndim != 2:
        raise DataError(f"expected {name} of shape (H, W), got {array.shape}")
    if array.dtype != np.uint8:
        raise DataError(f"expected uint8 {name}, got {array.dtype}")
    return np.ascontiguousarray(array)


def check_mask(mask, shape=None):
    """Validate a boolean fan mask of image shape ``shape`` (None: any 2D shape)."""
    array = np.asarray(mask)
    if shape is None and array.ndim != 2:
        raise DataError(f"expected mask of shape (H, W), got {array.shape}")
    if shape is not None and array.shape != tuple(shape):
        raise DataError(f"expected mask of shape {tuple(shape)}, got {array.shape}")
    if array.dtype != bool:
        raise DataError(f"expected a bool mask, got {array.dtype}")
    if not array.any():
        raise DataError("mask is empty")
    return np.ascontiguousarray(array)


def check_spacing(spacing_mm):
    """Validate (sx, sy) in mm per pixel (columns, rows) and return two floats."""
    try:
        sx, sy = (float(v) for v in spacing_mm)
    except (TypeError, ValueError):
        raise DataError(f"expected spacing_mm as (sx, sy), got {spacing_mm!r}") from None
    if not (np.isfinite(sx) and np.isfinite(sy) and sx > 0 and sy > 0):
        raise DataError(f"expected positive finite spacing_mm, got ({sx}, {sy})")
    return sx, sy


def fan_mask_from_frames(frames, *, min_fraction=0.5, erode_px=3, max_frames=100):
    """The imaged region (the fan) of a scan, found from the data.

    A pixel belongs to the fan if it is nonzero in at least ``min_fraction`` of the frames. The
    result is closed and opened (fills dark speckle pixels, drops thin overlays), reduced to its
    largest connected component with holes filled, and eroded so that the fan's edge is excluded.

    Parameters
    ----------
    frames : (n, H, W) uint8
        The scan (any H, W).
    min_fraction : float
        Fraction of frames in which a pixel must be nonzero.
    erode_px : int
        Erosion radius in pixels applied last.
    max_frames : int
        At most this many frames, evenly spaced, are looked at.

    Returns
    -------
    mask : (H, W) bool

    Raises
    ------
    DataError
        On bad frames, or when no region (or nothing after erosion) is left.
    """
    frames = check_frames(frames)
    if not 0.0 < min_fraction <= 1.0:
        raise DataError(f"expected 0 < min_fraction <= 1, got {min_fraction}")
    if erode_px < 0 or max_frames < 1:
        raise DataError(f"expected erode_px >= 0 and max_frames >= 1, got {erode_px} and {max_frames}")
    n = frames.shape[0]
    index = np.unique(np.linspace(0, n - 1, min(n, int(max_frames))).round().astype(np.int64))
    raw = ((frames[index] > 0).mean(axis=0) >= min_fraction).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    cleaned = cv2.morphologyEx(cv2.morphologyEx(raw, cv2.MORPH_CLOSE, kernel), cv2.MORPH_OPEN, kernel)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(cleaned, connectivity=8)
    if count < 2:
        raise DataError(f"no imaged region: no pixel is nonzero in {min_fraction:.0%} of the frames")
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    fan = ndimage.binary_fill_holes(labels == largest)
    if erode_px:
        disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * erode_px + 1, 2 * erode_px + 1))
        fan = cv2.erode(fan.astype(np.uint8), disk, borderType=cv2.BORDER_CONSTANT, borderValue=0) > 0
    if not fan.any():
        raise DataError(f"imaged region vanishes after eroding {erode_px} pixels")
    return fan


@dataclass(frozen=True)
class InplaneMotion:
    """Rigid in-plane motion ``T_{fixed←moving}`` in image-mm (see the module docstring).

    Attributes
    ----------
    tx_mm, ty_mm : float
        Translation (mm) applied after the rotation: where the moving frame's image-mm origin lands
        in the fixed frame.
    theta_rad : float
        Rotation about the image normal (+z) through the image-mm origin, radians.
    covariance : (3, 3) ndarray
        Covariance of (tx_mm, ty_mm, theta_rad): the fit's Jacobian and residual variance, as if the
        flow vectors were independent, times 4 (measured: flow errors are spatially correlated).
        Translation and rotation are strongly correlated because the origin lies outside the image.
    residual_rms_mm : float
        RMS length of the inlier flow residuals (mm).
    inlier_fraction : float
        Fraction of tracked grid points kept by RANSAC and the final residual cut.
    n_points : int
        Number of inlier flow vectors used in the final fit.

    A failed estimate (too few tracked points) has NaN parameters, infinite covariance and
    ``n_points = 0``; check :attr:`ok`.
    """

    tx_mm: float
    ty_mm: float
    theta_rad: float
    covariance: np.ndarray = field(repr=False)
    residual_rms_mm: float
    inlier_fraction: float
    n_points: int

    @classmethod
    def failed(cls):
        """The result returned when the motion cannot be estimated."""
        return cls(np.nan, np.nan, np.nan, np.full((3, 3), np.inf), np.nan, 0.0, 0)

    @property
    def ok(self):
        """True if the estimate is finite."""
        return bool(np.isfinite([self.tx_mm, self.ty_mm, self.theta_rad]).all())

    @property
    def params(self):
        """(3,) array (tx_mm, ty_mm, theta_rad)."""
        return np.array([self.tx_mm, self.ty_mm, self.theta_rad])

    @property
    def sigma(self):
        """(3,) standard deviations of (tx_mm, ty_mm, theta_rad)."""
        return np.sqrt(np.diag(self.covariance))

    @property
    def matrix(self):
        """(3, 3) homogeneous 2D matrix mapping moving image-mm (x, y, 1) to fixed image-mm."""
        c, s = np.cos(self.theta_rad), np.sin(self.theta_rad)
        return np.array([[c, -s, self.tx_mm], [s, c, self.ty_mm], [0.0, 0.0, 1.0]])

    @property
    def matrix4(self):
        """(4, 4) rigid image-mm transform: rotation θ about +z and translation (tx, ty, 0)."""
        out = np.eye(4)
        m = self.matrix
        out[:2, :2] = m[:2, :2]
        out[:2, 3] = m[:2, 2]
        return out

    def apply(self, points_mm):
        """Map moving-frame image-mm points (..., 2) to fixed-frame image-mm points (..., 2)."""
        p = np.asarray(points_mm, dtype=np.float64)
        m = self.matrix
        return p @ m[:2, :2].T + m[:2, 2]


def track_points(mask, *, grid_px=20, window_px=13):
    """Grid points (0-based column, row) whose whole LK window lies inside ``mask``.

    Returns
    -------
    points : (m, 2) float32
    """
    half = window_px // 2 + 1
    disk = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * half + 1, 2 * half + 1))
    inner = cv2.erode(mask.astype(np.uint8), disk, borderType=cv2.BORDER_CONSTANT, borderValue=0) > 0
    rows, cols = np.mgrid[grid_px // 2 : mask.shape[0] : grid_px, grid_px // 2 : mask.shape[1] : grid_px]
    keep = inner[rows, cols]
    return np.stack([cols[keep], rows[keep]], axis=1).astype(np.float32)


def _rigid_lsq(src, dst):
    """Least-squares rigid 2D fit dst ≈ R(θ)·src + t (closed form). Returns θ, t (2,)."""
    ms, md = src.mean(axis=0), dst.mean(axis=0)
    a, b = src - ms, dst - md
    theta = np.arctan2(np.sum(a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]), np.sum(a[:, 0] * b[:, 0] + a[:, 1] * b[:, 1]))
    c, s = np.cos(theta), np.sin(theta)
    return theta, md - np.array([c * ms[0] - s * ms[1], s * ms[0] + c * ms[1]])


def _residuals(src, dst, theta, t):
    c, s = np.cos(theta), np.sin(theta)
    pred = np.stack([c * src[:, 0] - s * src[:, 1], s * src[:, 0] + c * src[:, 1]], axis=1) + t
    return np.linalg.norm(dst - pred, axis=1)


def fit_rigid(src_mm, dst_mm, *, ransac_threshold_mm=0.3):
    """Robust rigid 2D fit ``dst ≈ R(θ)·src + t`` with uncertainty.

    RANSAC on a 4-dof similarity (``cv2.estimateAffinePartial2D``) selects inliers; a closed-form
    least-squares rigid fit on them follows, then one residual cut at 3σ (σ from the median inlier
    residual) and a final refit.

    Parameters
    ----------
    src_mm, dst_mm : (m, 2) float
        Corresponding points (mm).
    ransac_threshold_mm : float
        RANSAC inlier distance.

    Returns
    -------
    InplaneMotion
        With ``tx_mm, ty_mm = t`` and ``theta_rad = θ``.
    """
    src = np.asarray(src_mm, dtype=np.float64)
    dst = np.asarray(dst_mm, dtype=np.float64)
    n_total = src.shape[0]
    if n_total < _MIN_POINTS:
        return InplaneMotion.failed()
    _, inliers = cv2.estimateAffinePartial2D(
        src.astype(np.float32), dst.astype(np.float32), method=cv2.RANSAC,
        ransacReprojThreshold=float(ransac_threshold_mm), maxIters=500, confidence=0.995,
    )
    if inliers is None or inliers.sum() < _MIN_POINTS:
        return InplaneMotion.failed()
    inliers = inliers.ravel().astype(bool)
    theta, t = _rigid_lsq(src[inliers], dst[inliers])
    res = _residuals(src, dst, theta, t)
    scale = max(np.median(res[inliers]) / _RAYLEIGH_MEDIAN, 1e-6)
    inliers = res < 3.0 * scale
    n = int(inliers.sum())
    if n < _MIN_POINTS:
        return InplaneMotion.failed()
    theta, t = _rigid_lsq(src[inliers], dst[inliers])
    res = _residuals(src[inliers], dst[inliers], theta, t)
    variance = np.sum(res**2) / max(2 * n - 3, 1)  # per-axis residual variance
    c, s = np.cos(theta), np.sin(theta)
    x, y = src[inliers, 0], src[inliers, 1]
    da, db = -(s * x + c * y), c * x - s * y  # ∂(x', y')/∂θ
    normal = np.array([[n, 0.0, da.sum()], [0.0, n, db.sum()], [da.sum(), db.sum(), np.sum(da**2 + db**2)]])
    covariance = _COVARIANCE_INFLATION * variance * np.linalg.inv(normal)
    return InplaneMotion(
        float(t[0]), float(t[1]), float(theta), covariance,
        float(np.sqrt(np.mean(res**2))), n / n_total, n,
    )


def track_grid(fixed, moving, points, mask, spacing, *, window_px, levels, ransac_threshold_mm, retry_window_px=None,
               retry_points=None, retry_below=0.5):
    """:func:`estimate_inplane` without input checks, for callers that track many pairs.

    Parameters
    ----------
    fixed, moving : (H, W) uint8
    points : (m, 2) float32
        Grid points of ``moving`` (0-based column, row), from :func:`track_points`.
    mask : (H, W) bool
    spacing : (float, float)
    window_px, levels, ransac_threshold_mm, retry_window_px, retry_below
        As in :func:`estimate_inplane`.
    retry_points : (m', 2) float32, optional
        Grid points for the retry window (:func:`track_points` with ``retry_window_px``); default
        ``points``.

    Returns
    -------
    InplaneMotion
        ``T_{fixed←moving}``; ``inlier_fraction`` is relative to all of the points tracked.
    """
    result = _track(fixed, moving, points, mask, spacing, window_px, levels, ransac_threshold_mm)
    if retry_window_px is None or (result.ok and result.inlier_fraction >= retry_below):
        return result
    # much of the fan is decorrelated (large out-of-plane motion): small windows lock onto noise
    # there, and RANSAC's consensus drifts; larger windows average more of the remaining speckle
    retry = _track(fixed, moving, points if retry_points is None else retry_points, mask, spacing,
                   int(retry_window_px), levels, ransac_threshold_mm)
    # a consensus of a few points is chance when nothing is left correlated (e.g. a 3° fan)
    return retry if retry.ok and retry.inlier_fraction >= _RETRY_MIN_INLIERS else result


def _track(fixed, moving, points, mask, spacing, window_px, levels, ransac_threshold_mm):
    found, status, _ = cv2.calcOpticalFlowPyrLK(
        moving, fixed, points, None, winSize=(window_px, window_px), maxLevel=levels, criteria=_LK_CRITERIA
    )
    if found is None:
        return InplaneMotion.failed()
    ok = status.ravel() == 1
    col, row = found[:, 0], found[:, 1]
    h, w = mask.shape
    inside = (col >= 0) & (row >= 0) & (col <= w - 1) & (row <= h - 1)
    ok &= inside
    # a point tracked out of the fan was matched against the black border: drop it
    ok[ok] = mask[np.rint(row[ok]).astype(np.int64), np.rint(col[ok]).astype(np.int64)]
    sx, sy = spacing
    src = np.stack([sx * (points[ok, 0] + 1.0), sy * (points[ok, 1] + 1.0)], axis=1)
    dst = np.stack([sx * (col[ok] + 1.0), sy * (row[ok] + 1.0)], axis=1)
    result = fit_rigid(src, dst, ransac_threshold_mm=ransac_threshold_mm)
    if not result.ok:
        return result
    # relative to all grid points, so points lost by LK lower the confidence too
    return replace(result, inlier_fraction=result.n_points / points.shape[0])


def estimate_inplane(fixed, moving, *, mask, spacing_mm, grid_px=20, window_px=13, levels=3,
                     ransac_threshold_mm=0.3, retry_window_px=None, retry_below=0.5, threads=None):
    """Rigid in-plane motion ``T_{fixed←moving}`` between two frames.

    Pyramidal Lucas-Kanade tracks a grid of points of ``moving`` (inside ``mask``) into ``fixed``;
    the correspondences, converted to image-mm, are fitted by :func:`fit_rigid`.

    Parameters
    ----------
    fixed, moving : (H, W) uint8
        The two frames; e.g. ``frames[i - 1], frames[i]`` for the in-plane part of L_i.
    mask : (H, W) bool
        Imaged region (e.g. from :func:`fan_mask_from_frames`).
    spacing_mm : (float, float)
        (sx, sy), mm per pixel along columns and rows.
    grid_px : int
        Spacing of the tracked grid, pixels.
    window_px : int
        LK window size, pixels (odd).
    levels : int
        LK pyramid levels above full resolution (motion up to ~``window_px · 2**levels / 2`` px).
    ransac_threshold_mm : float
        RANSAC inlier distance, mm.
    retry_window_px : int, optional
        If given, a pair whose fit fails or keeps fewer than ``retry_below`` of the tracked points is
        tracked again with this (larger) window, and that result is returned when it succeeds with at
        least a fifth of its points as inliers. Where much of the fan has decorrelated (out-of-plane
        motion of a few σ) 13-pixel windows follow noise: on simulated 2° fans about the skin contact
        a 21-pixel retry cut the translation error from 0.15-0.39 mm to 0.02-0.17 mm, at 2.6x the
        flow time of the pairs retried. None (default): no retry.
    retry_below : float
        Inlier fraction below which the retry is made.
    threads : int, optional
        OpenCV / Numba thread count (default: all cores).

    Returns
    -------
    InplaneMotion
        In-plane part of ``T_{fixed←moving}`` with its covariance and fit quality.

    Raises
    ------
    DataError
        On frames of another shape or dtype, a wrong mask, or bad spacing.
    """
    fixed = check_image(fixed, name="fixed")
    moving = check_image(moving, name="moving")
    if fixed.shape != moving.shape:
        raise DataError(f"expected frames of equal shape, got {fixed.shape} and {moving.shape}")
    mask = check_mask(mask, fixed.shape)
    spacing = check_spacing(spacing_mm)
    if grid_px < 1 or window_px < 3 or levels < 0:
        raise DataError(f"expected grid_px >= 1, window_px >= 3, levels >= 0, got {grid_px}, {window_px}, {levels}")
    if retry_window_px is not None and int(retry_window_px) < 3:
        raise DataError(f"expected retry_window_px None or >= 3, got {retry_window_px}")
    set_threads(threads)
    points = track_points(mask, grid_px=grid_px, window_px=window_px)
    retry_points = None if retry_window_px is None else track_points(mask, grid_px=grid_px,
                                                                     window_px=int(retry_window_px))
    return track_grid(fixed, moving, points, mask, spacing, window_px=window_px, levels=levels,
                      ransac_threshold_mm=ransac_threshold_mm, retry_window_px=retry_window_px,
                      retry_points=retry_points, retry_below=retry_below)
