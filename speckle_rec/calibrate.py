"""Fit decorrelation curves from tracked scans (``speckle-rec calibrate``).

For every tracked scan, frame pairs ``(i, j)`` are drawn at several strides so that their true
elevational distances cover ``0 … max_distance_mm`` evenly. The tracker gives the true image-mm
transform ``T_{i←j} = C⁻¹ · F_i⁻¹ · F_j · C`` (contract §3); from it each patch of frame ``i`` gets
its true |elevational distance| ``|tz + a·x + b·y|`` to frame ``j``'s plane, the pair's in-plane
rotation θ and the tilt about the patch's own beam (:func:`pair_geometry`). The patch correlations
ρ are measured as the pair estimator measures them in use (:func:`speckle_rec.outofplane.measure_pairs`:
LK flow on the pair, in-plane compensation, the model's patch size and smoothing, dark patches
dropped); a pair whose flow fails (speckle decorrelated, typically beyond ~2 mm) gives no samples.
:meth:`DecorrelationModel.fit` then fits the curves per depth band.

Sampling from scans ties distance, tilt and in-plane rotation together (a fan moves the deep patches
and tilts them at once), whereas tracked motions designed for calibration vary them independently;
the fitted factors are therefore a compromise that depends on the protocols calibrated on.

A random ``holdout`` fraction of the pairs is left out of a first fit to measure how well the curves
predict distances they were not fitted to (``holdout_residual_mm`` in the report); the model returned
is fitted on all pairs.

:func:`learn_direction_prior` counts the first out-of-plane direction of the tracked scans per scan
name (:class:`speckle_rec.direction.DirectionPrior`), which speckle alone cannot decide.
"""

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .decorrelation import DecorrelationModel
from .direction import DirectionPrior, first_direction
from .errors import DataError
from .inplane import fan_mask_from_frames
from .io import atomic_path
from .outofplane import fan_apex_mm, measure_pairs, patch_grid
from .progress import progress_bar
from .threads import set_threads
from .transforms import transforms_from_tforms

DEFAULT_STRIDES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
_DISTANCE_BINS = 12  # pairs are drawn evenly over this many bins of 0 … max_distance_mm
_CHUNK_PAIRS = 64  # pairs measured per call (progress granularity, memory)


@dataclass(frozen=True)
class CalibrationSamples:
    """Patch samples of measured frame pairs of tracked scans.

    Attributes
    ----------
    rho : (m,) float64
        Measured patch correlations (finite, bright patches only).
    distance_mm : (m,) float64
        True |elevational distance| at each patch centre, mm.
    depth_mm : (m,) float64
        Patch depth (image-mm y), mm.
    rotation_rad : (m,) float64
        True in-plane rotation θ of the sample's pair, radians.
    tilt_rad : (m,) float64
        True rotation about the patch's beam-lateral axis, radians (see :func:`pair_geometry`).
    pair : (m,) int64
        Row of ``pairs`` each sample comes from.
    pairs : (M, 3) int64
        (scan index, i, j) of every measured pair.
    scans : tuple of str
        ``SUBJECT/SCAN`` keys the scan indices refer to.
    inplane_error_mm : (M,) float64
        Distance between where the estimated and the true in-plane motion put the patch grid's
        centroid, mm (NaN where the flow failed): a check of the flow against the tracker.
    """

    rho: np.ndarray
    distance_mm: np.ndarray
    depth_mm: np.ndarray
    rotation_rad: np.ndarray
    tilt_rad: np.ndarray
    pair: np.ndarray
    pairs: np.ndarray
    scans: tuple
    inplane_error_mm: np.ndarray

    def __len__(self):
        return int(self.rho.size)

    def select_pairs(self, keep):
        """The samples of the pairs where ``keep`` (M,) bool is true (pair rows are kept as they are)."""
        use = np.asarray(keep, bool)[self.pair]
        return CalibrationSamples(self.rho[use], self.distance_mm[use], self.depth_mm[use], self.rotation_rad[use],
                                  self.tilt_rad[use], self.pair[use], self.pairs, self.scans, self.inplane_error_mm)


def pair_geometry(image_to_camera, pairs, *, x_mm, y_mm, apex_mm=None):
    """True geometry of frame pairs at patch centres, from tracked poses.

    Parameters
    ----------
    image_to_camera : (N, 4, 4) array_like
        Image-mm → camera pose of every frame (``tforms[k] · C``).
    pairs : (M, 2) array_like of int
        Frame pairs ``(i, j)``, each standing for ``T_{i←j} = image_to_camera[i]⁻¹ · image_to_camera[j]``.
    x_mm, y_mm : (P,) array_like
        Patch centres in frame ``i`` image-mm.
    apex_mm : (float, float), optional
        Fan apex (:func:`speckle_rec.outofplane.fan_apex_mm`); beams are parallel to y if None.

    Returns
    -------
    distance_mm : (M, P) ndarray
        |tz + a·x + b·y|: distance along frame ``i``'s normal from each patch centre to frame ``j``'s
        plane ``z = tz + a·x + b·y``, mm.
    rotation_rad : (M,) ndarray
        In-plane rotation θ as the flow sees it: the angle of the least-squares rigid 2D motion
        taking the patch centres of frame ``j`` to their projections ``(T_{i←j} p)_xy`` in frame
        ``i`` (it differs from an Euler angle of ``T_{i←j}`` by products of the out-of-plane angles).
    tilt_rad : (M, P) ndarray
        ``α·cos φ − β·sin φ``: the rotation about each patch's beam-lateral axis (φ: beam angle at
        the patch), with α, β the plane's angles about image x and y given θ
        (:meth:`speckle_rec.outofplane.PlaneFit.angles`); radians. The model's tilt factor takes it.
    inplane : (M, 3, 3) ndarray
        That rigid 2D motion as a homogeneous image-mm matrix (moving → fixed, like
        :attr:`speckle_rec.inplane.InplaneMotion.matrix`).
    """
    poses = np.asarray(image_to_camera, dtype=np.float64)
    index = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    x = np.asarray(x_mm, dtype=np.float64).ravel()
    y = np.asarray(y_mm, dtype=np.float64).ravel()
    # a generic inverse, as the contract's formulas: float32 tracker matrices are not exactly rigid
    relative = np.linalg.solve(poses[index[:, 0]], poses[index[:, 1]])
    normal = relative[:, :3, 2]
    a = -normal[:, 0] / normal[:, 2]
    b = -normal[:, 1] / normal[:, 2]
    tz = np.einsum("mk,mk->m", normal, relative[:, :3, 3]) / normal[:, 2]
    distance = np.abs(tz[:, None] + a[:, None] * x[None, :] + b[:, None] * y[None, :])
    # closed-form 2D Procrustes of the patch centres onto their projected images
    src = np.stack([x, y], axis=1)
    dst = np.einsum("mij,pj->mpi", relative[:, :2, :2], src) + relative[:, None, :2, 3]
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=1)
    u, v = src - src_mean, dst - dst_mean[:, None, :]
    theta = np.arctan2(np.sum(u[None, :, 0] * v[..., 1] - u[None, :, 1] * v[..., 0], axis=1),
                       np.sum(u[None, :, 0] * v[..., 0] + u[None, :, 1] * v[..., 1], axis=1))
    c, s = np.cos(theta), np.sin(theta)
    inplane = np.zeros((index.shape[0], 3, 3))
    inplane[:, 0, 0], inplane[:, 0, 1], inplane[:, 1, 0], inplane[:, 1, 1] = c, -s, s, c
    inplane[:, :2, 2] = dst_mean - np.einsum("mij,j->mi", inplane[:, :2, :2], src_mean)
    inplane[:, 2, 2] = 1.0
    # plane angles given θ, exactly as PlaneFit.angles
    wx, wy = c * -a + s * -b, -s * -a + c * -b
    alpha = np.arctan(-wy)
    beta = np.arctan(wx * np.cos(alpha))
    if apex_mm is None:
        cos_f, sin_f = np.ones_like(x), np.zeros_like(x)
    else:
        beam = np.arctan2(x - apex_mm[0], y - apex_mm[1])
        cos_f, sin_f = np.cos(beam), np.sin(beam)
    tilt = alpha[:, None] * cos_f[None, :] - beta[:, None] * sin_f[None, :]
    return distance, theta, tilt, inplane


def sample_pairs(image_to_camera, *, x_mm, y_mm, n_pairs, strides=DEFAULT_STRIDES, max_distance_mm=3.0, rng=None):
    """Frame pairs at several strides whose true distances cover ``0 … max_distance_mm`` evenly.

    Every ``(i, i + s)`` for ``s`` in ``strides`` is a candidate; its distance is the median over
    the patch centres of the true |elevational distance| (:func:`pair_geometry`). Candidates up to
    ``max_distance_mm`` are binned by distance and drawn without replacement, the same number per
    bin as far as the bins allow.

    Parameters
    ----------
    image_to_camera : (N, 4, 4) array_like
    x_mm, y_mm : (P,) array_like
        Patch centres, image-mm.
    n_pairs : int
        Pairs wanted (fewer are returned when fewer candidates qualify).
    strides : sequence of int
        Positive frame strides.
    max_distance_mm : float
        Largest median distance of a pair, mm (≈ 3 σ: beyond it ρ is at the noise floor).
    rng : numpy.random.Generator, optional

    Returns
    -------
    (M, 2) int64 ndarray
        Pairs ``(i, j)``, ``j > i``, sorted.
    """
    rng = np.random.default_rng() if rng is None else rng
    n = np.asarray(image_to_camera).shape[0]
    candidates = [np.stack([np.arange(n - s), np.arange(s, n)], axis=1) for s in sorted(set(strides)) if s < n]
    if not candidates or n_pairs < 1:
        return np.empty((0, 2), np.int64)
    candidates = np.concatenate(candidates)
    distance = np.median(pair_geometry(image_to_camera, candidates, x_mm=x_mm, y_mm=y_mm)[0], axis=1)
    inside = distance <= max_distance_mm
    candidates, distance = candidates[inside], distance[inside]
    bins = np.minimum((distance / max_distance_mm * _DISTANCE_BINS).astype(np.int64), _DISTANCE_BINS - 1)
    members = [rng.permutation(np.nonzero(bins == b)[0]) for b in range(_DISTANCE_BINS)]
    chosen, wanted = [], int(n_pairs)
    # fill the emptiest bins first so a sparse bin's shortfall goes to the others
    for rank, b in enumerate(sorted(range(_DISTANCE_BINS), key=lambda k: members[k].size)):
        take = members[b][: max(0, wanted // (_DISTANCE_BINS - rank))]
        chosen.append(take)
        wanted -= take.size
    pairs = candidates[np.concatenate(chosen)]
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def _read(scan, indices):
    """Frames ``indices`` of a scan (n, H, W) uint8; one read per frame (h5py's list selection is slow)."""
    with scan.frames() as frames:
        return np.stack([frames[int(k)] for k in indices])


def _tracked_scans(dataset):
    scans = [scan for scan in dataset.scans if scan.tracked]
    if not scans:
        raise DataError("calibrate needs tracked scans (tforms); this folder has none (test data?)", dataset.root)
    return scans


def collect_samples(dataset, *, model=None, pairs_per_scan=300, strides=DEFAULT_STRIDES, max_distance_mm=3.0,
                    seed=0, threads=None, progress=True):
    """Measure patch correlations of sampled frame pairs of every tracked scan, with their truth.

    Parameters
    ----------
    dataset : speckle_rec.io.Dataset
        Its untracked scans are skipped.
    model : DecorrelationModel, optional
        Supplies the patch size and smoothing ρ is measured with (default: the packaged model's).
    pairs_per_scan : int
        Frame pairs drawn per scan (:func:`sample_pairs`).
    strides, max_distance_mm
        See :func:`sample_pairs`.
    seed : int
        Seeds the pair sampling.
    threads : int, optional
        Numba / OpenCV threads (default: all cores).
    progress : bool
        Progress bar on stderr.

    Returns
    -------
    CalibrationSamples

    Raises
    ------
    DataError
        Without tracked scans, on unreadable files (named), or when no patch fits in the images.
    """
    scans = _tracked_scans(dataset)
    if int(pairs_per_scan) < 1:
        raise DataError(f"expected pairs_per_scan >= 1, got {pairs_per_scan}")
    if not (math.isfinite(max_distance_mm) and max_distance_mm > 0):
        raise DataError(f"expected max_distance_mm > 0, got {max_distance_mm}")
    strides = tuple(int(s) for s in strides)
    if not strides or min(strides) < 1:
        raise DataError(f"expected positive strides, got {list(strides)}")
    model = DecorrelationModel.default() if model is None else model
    calibration = dataset.calibration()
    spacing = calibration.spacing_mm
    threads = set_threads(threads)
    rng = np.random.default_rng(seed)
    columns = {k: [] for k in ("rho", "distance_mm", "depth_mm", "rotation_rad", "tilt_rad", "pair")}
    all_pairs, errors = [], []
    plans = []
    for s, scan in enumerate(scans):
        poses = scan.read_tforms() @ calibration.image_to_tool
        n = scan.shape()[0]
        # the fan, from frames spread over the scan (as fan_mask_from_frames does with a whole scan)
        spread = _read(scan, np.unique(np.linspace(0, n - 1, min(n, 100)).round().astype(np.int64)))
        mask = fan_mask_from_frames(spread)
        grid = patch_grid(mask, spacing_mm=spacing, patch_mm=model.patch_mm)
        pairs = sample_pairs(poses, x_mm=grid.x_mm, y_mm=grid.y_mm, n_pairs=pairs_per_scan, strides=strides,
                             max_distance_mm=max_distance_mm, rng=rng)
        plans.append((s, scan, poses, mask, grid, pairs))
    bar = progress_bar(total=sum(len(p[-1]) for p in plans), desc="calibrate", unit="pair", enabled=progress)
    with bar:
        for s, scan, poses, mask, grid, pairs in plans:
            apex = fan_apex_mm(mask, spacing_mm=spacing)
            centroid = np.array([grid.x_mm.mean(), grid.y_mm.mean(), 1.0])
            for start in range(0, len(pairs), _CHUNK_PAIRS):
                chunk = pairs[start:start + _CHUNK_PAIRS]
                frames_used, local = np.unique(chunk, return_inverse=True)
                stack = _read(scan, frames_used)
                measured = measure_pairs(stack, local.reshape(-1, 2), mask=mask, spacing_mm=spacing, model=model,
                                         grid=grid, apex_mm=apex, threads=threads)
                distance, theta, tilt, inplane = pair_geometry(poses, chunk, x_mm=grid.x_mm, y_mm=grid.y_mm,
                                                               apex_mm=apex)
                for k, m in enumerate(measured):
                    row = len(all_pairs)
                    all_pairs.append((s, *chunk[k]))
                    error = (m.inplane.matrix - inplane[k]) @ centroid if m.inplane.ok else np.full(3, np.nan)
                    errors.append(float(np.hypot(error[0], error[1])))
                    use = m.bright & np.isfinite(m.rho)
                    columns["rho"].append(m.rho[use])
                    columns["distance_mm"].append(distance[k, use])
                    columns["depth_mm"].append(grid.y_mm[use])
                    columns["rotation_rad"].append(np.full(use.sum(), theta[k]))
                    columns["tilt_rad"].append(tilt[k, use])
                    columns["pair"].append(np.full(use.sum(), row, np.int64))
                bar.update(len(chunk))
    if not all_pairs:
        raise DataError(f"no frame pairs within {max_distance_mm:g} mm in the tracked scans", dataset.root)
    data = {k: np.concatenate(v) for k, v in columns.items()}
    return CalibrationSamples(**data, pairs=np.array(all_pairs, np.int64).reshape(-1, 3),
                              scans=tuple(scan.key for scan in scans), inplane_error_mm=np.array(errors))


def band_residuals(model, samples, *, edges_mm=None):
    """Accuracy of a model's inverted distances on samples, per depth band.

    Parameters
    ----------
    model : DecorrelationModel
    samples : CalibrationSamples
        E.g. from held-out scans or pairs.
    edges_mm : (B + 1,) array_like, optional
        Depth bands (image-mm y); default the model's.

    Returns
    -------
    dict
        ``edges_mm`` (B + 1,), and per band (B,): ``rms_mm`` (RMS error of the distances inverted
        where the model's ρ is usable, NaN if none), ``median_abs_mm``, ``inverted`` (how many were
        inverted) and ``samples``.
    """
    edges = model.depth_edges_mm if edges_mm is None else np.asarray(edges_mm, dtype=np.float64)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):  # angles that decorrelate fully
        estimate, _ = model.distance(samples.rho, samples.depth_mm, samples.rotation_rad, samples.tilt_rad)
    error = estimate - samples.distance_mm
    band = np.searchsorted(edges, samples.depth_mm, side="right") - 1
    out = {"edges_mm": edges, "rms_mm": [], "median_abs_mm": [], "inverted": [], "samples": []}
    for b in range(edges.size - 1):
        sel = band == b
        e = error[sel & np.isfinite(error)]
        out["rms_mm"].append(float(np.sqrt(np.mean(e**2))) if e.size else np.nan)
        out["median_abs_mm"].append(float(np.median(np.abs(e))) if e.size else np.nan)
        out["inverted"].append(int(e.size))
        out["samples"].append(int(sel.sum()))
    return {k: np.asarray(v) for k, v in out.items()}


def _band_edges(depth_mm, bands):
    """Band edges from ``bands`` (None: ~10 mm bands, at most 8; int: equal widths; or the edges)."""
    lo, hi = math.floor(depth_mm.min()), math.ceil(depth_mm.max() + 1e-6)
    if bands is None:
        bands = int(np.clip(round((hi - lo) / 10.0), 1, 8))
    if np.ndim(bands) == 0:
        if int(bands) < 1:
            raise DataError(f"expected bands >= 1, got {bands}")
        return np.linspace(lo, hi, int(bands) + 1)
    edges = np.asarray(bands, dtype=np.float64).ravel()
    if edges.size < 2 or not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0):
        raise DataError(f"expected at least 2 increasing band edges, got {edges.tolist()}")
    return edges


def _finite_or_none(value, scale=1.0):
    return float(value) * scale if np.isfinite(value) else None


def calibrate_model(dataset, *, pairs_per_scan=300, bands=None, strides=DEFAULT_STRIDES, max_distance_mm=3.0,
                    holdout=0.2, floor=None, shape=None, patch_mm=None, smooth_px=None, min_band_samples=500,
                    description="", seed=0, threads=None, progress=True):
    """Fit a :class:`DecorrelationModel` to the tracked scans of a data folder.

    Parameters
    ----------
    dataset : speckle_rec.io.Dataset
        Needs at least one tracked scan; untracked scans are skipped (listed in the report).
    pairs_per_scan : int
        Frame pairs drawn per scan (:func:`sample_pairs`); each gives one sample per bright patch.
    bands : None, int or (B + 1,) array_like
        Depth bands (image-mm y): None for ~10 mm bands (at most 8) over the patch depths, a count
        of equal bands, or the edges.
    strides, max_distance_mm
        Pair sampling, see :func:`sample_pairs`.
    holdout : float
        Fraction of the pairs (in [0, 0.5]) left out of a first fit to measure the held-out
        residual per band; 0 skips it.
    floor, shape : float, optional
        Fix the curves' floor c or shape exponent p (see :meth:`DecorrelationModel.fit`).
    patch_mm : (float, float), optional
        Patch size to measure ρ with; default the packaged model's.
    smooth_px : float, optional
        Gaussian pre-smoothing (pixels); default the packaged model's.
    min_band_samples : int
        Fewest samples a band may have.
    description : str
        Prepended to the model's description (which always says how it was made).
    seed : int
        Seeds the pair sampling and the hold-out split.
    threads : int, optional
        Numba / OpenCV threads (default: all cores).
    progress : bool
        Progress bar on stderr.

    Returns
    -------
    model : DecorrelationModel
        Fitted on all pairs; ``residual_mm`` and ``n_samples`` are on the fitting data.
    report : dict
        JSON-ready: the data used, the sampling, the flow's agreement with the tracker and, per
        band, the parameters, samples, fit residual and held-out residual (mm).

    Raises
    ------
    DataError
        Without tracked scans ("calibrate needs tracked scans (tforms)"), on unreadable files, on
        bad options, or when a depth band gets fewer than ``min_band_samples`` samples.
    """
    started = time.perf_counter()
    if not 0.0 <= holdout <= 0.5:
        raise DataError(f"expected 0 <= holdout <= 0.5, got {holdout}")
    default = DecorrelationModel.default()
    patch_mm = default.patch_mm if patch_mm is None else tuple(float(v) for v in patch_mm)
    smooth_px = default.smooth_px if smooth_px is None else float(smooth_px)
    # measure_pairs takes the patch size and smoothing from the model: a stand-in with ours
    measurer = replace(default, patch_mm=patch_mm, smooth_px=smooth_px)
    samples = collect_samples(dataset, model=measurer, pairs_per_scan=pairs_per_scan, strides=strides,
                              max_distance_mm=max_distance_mm, seed=seed, threads=threads, progress=progress)
    if len(samples) == 0:
        raise DataError("no usable patch samples (all frame pairs failed or were dark)", dataset.root)
    edges = _band_edges(samples.depth_mm, bands)
    band = np.searchsorted(edges, samples.depth_mm, side="right") - 1
    counts = np.bincount(band[(band >= 0) & (band < edges.size - 1)], minlength=edges.size - 1)
    for b, count in enumerate(counts):
        if count < min_band_samples:
            raise DataError(
                f"depth band {b} ({edges[b]:.1f}-{edges[b + 1]:.1f} mm) has {count} usable samples, need "
                f"{min_band_samples}: use fewer bands or more pairs per scan", dataset.root)

    options = dict(bands=edges, floor=floor, shape=shape, patch_mm=patch_mm, smooth_px=smooth_px)

    def fit(data, text=""):
        return DecorrelationModel.fit(data.rho, data.distance_mm, data.depth_mm, rotation_rad=data.rotation_rad,
                                      tilt_rad=data.tilt_rad, description=text, **options)

    held_out = None
    if holdout > 0:
        rng = np.random.default_rng([seed, 1])
        test = rng.random(len(samples.pairs)) < holdout
        held_out = band_residuals(fit(samples.select_pairs(~test)), samples.select_pairs(test))

    strides_used, stride_counts = np.unique(samples.pairs[:, 2] - samples.pairs[:, 1], return_counts=True)
    made = (f"speckle-rec calibrate (speckle_rec.calibrate) on {dataset.root}: {len(samples.scans)} tracked scan(s), "
            f"{len(samples.pairs)} frame pairs at strides {strides_used.tolist()} with true median |d| <= "
            f"{max_distance_mm:g} mm (seed {seed}), {len(samples)} patch samples; rho measured by "
            f"speckle_rec.outofplane.measure_pairs (LK in-plane compensation, {patch_mm[0]:g} x {patch_mm[1]:g} mm "
            f"patches, smooth_px {smooth_px:g}, dark_fraction 0.6); true |d|, in-plane rotation and tilt about each "
            "patch's beam from the tracker; DecorrelationModel.fit per depth band")
    model = fit(samples, f"{description.rstrip()} {made}".strip())

    rows = []
    for b in range(edges.size - 1):
        rows.append({
            "depth_mm": [float(edges[b]), float(edges[b + 1])],
            "samples": int(model.n_samples[b]),
            "sigma_mm": float(model.sigma_mm[b]),
            "floor": float(model.floor[b]),
            "shape": float(model.shape[b]),
            "peak": float(model.peak[b]),
            "rotation_sigma_deg": _finite_or_none(model.rotation_sigma_rad[b], 180.0 / math.pi),
            "tilt_sigma_deg": _finite_or_none(model.tilt_sigma_rad[b], 180.0 / math.pi),
            "residual_mm": _finite_or_none(model.residual_mm[b]),
            "holdout_residual_mm": None if held_out is None else _finite_or_none(held_out["rms_mm"][b]),
            "holdout_inverted": None if held_out is None else int(held_out["inverted"][b]),
        })
    flow = samples.inplane_error_mm
    ok = np.isfinite(flow)
    report = {
        "data": str(dataset.root),
        "scans": list(samples.scans),
        "skipped_untracked": [scan.key for scan in dataset.scans if not scan.tracked],
        "pairs_per_scan": int(pairs_per_scan),
        "pairs": int(len(samples.pairs)),
        "pairs_by_stride": {str(s): int(c) for s, c in zip(strides_used, stride_counts)},
        "samples": int(len(samples)),
        "max_distance_mm": float(max_distance_mm),
        "holdout": float(holdout),
        "seed": int(seed),
        "flow_failures": int((~ok).sum()),
        "inplane_error_mm": {"median": _finite_or_none(np.median(flow[ok])) if ok.any() else None,
                             "p95": _finite_or_none(np.percentile(flow[ok], 95)) if ok.any() else None},
        "bands": rows,
        "seconds": round(time.perf_counter() - started, 2),
    }
    return model, report


def learn_direction_prior(dataset, *, threshold_mm=1.0):
    """Count the first out-of-plane direction of every tracked scan, per scan name.

    Parameters
    ----------
    dataset : speckle_rec.io.Dataset
        Needs at least one tracked scan; only ``tforms`` are read.
    threshold_mm : float
        Mean |elevation| of a 3 x 3 grid of image points (20/50/80 % of the width and height)
        that counts as the first move (:func:`speckle_rec.direction.first_direction`).

    Returns
    -------
    speckle_rec.direction.DirectionPrior

    Raises
    ------
    DataError
        Without tracked scans, or on unreadable or malformed ``tforms``.
    """
    calibration = dataset.calibration()
    sx, sy = calibration.spacing_mm
    found = {}
    for scan in _tracked_scans(dataset):
        _, height, width = scan.shape()
        points = np.array([(sx * (fx * width + 1.0), sy * (fy * height + 1.0))
                           for fx in (0.2, 0.5, 0.8) for fy in (0.2, 0.5, 0.8)])
        frame_to_first, _ = transforms_from_tforms(scan.read_tforms(), calibration.image_to_tool,
                                                   source=scan.tforms_path)
        found.setdefault(scan.name, []).append(first_direction(frame_to_first, points, threshold_mm=threshold_mm))
    return DirectionPrior.learn(found)


def save_calibration(path, model, *, report=None, prior=None):
    """Write the calibration file ``speckle-rec reconstruct --calibration`` reads, atomically.

    Parameters
    ----------
    path : str or Path
        JSON file: the model's keys (:meth:`DecorrelationModel.to_dict`), plus ``calibration`` (the
        :func:`calibrate_model` report) and ``direction_prior`` (:meth:`DirectionPrior.to_dict`)
        when given.
    model : DecorrelationModel
    report : dict, optional
    prior : DirectionPrior, optional
    """
    payload = model.to_dict()
    if report is not None:
        payload["calibration"] = report
    if prior is not None:
        payload["direction_prior"] = prior.to_dict()
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
