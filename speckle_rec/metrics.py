"""The challenge metrics (contract §5): GPE, GLE, LPE, LLE and the 2025 / 2024 scores.

Errors are computed either straight from transforms (no dense field is materialised: the
difference of two rigid displacements is affine in the pixel coordinates) or from DDF arrays,
frame chunk by frame chunk. Both give the dense definition's number up to float rounding.
"""

import numpy as np

from . import _ddf_kernels as kernels
from .ddf import DEFAULT_CHUNK_FRAMES, _transforms_array, landmark_ddfs, pixel_ddfs
from .errors import DataError

METRICS = ("GPE", "GLE", "LPE", "LLE")


def _same_shape(a, b, what):
    if tuple(a.shape) != tuple(b.shape):
        raise DataError(f"expected {what} of equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")


def pixel_errors_from_transforms(true_transforms, pred_transforms, grid):
    """Per-frame mean pixel error between two sets of rigid transforms.

    Parameters
    ----------
    true_transforms, pred_transforms : array_like, shape (n, 4, 4)
    grid : PixelGrid

    Returns
    -------
    ndarray, shape (n,), float64
        Mean over the H·W pixels of ‖(T_true − T_pred)·q‖ in mm for each frame.
    """
    t = _transforms_array(true_transforms, "true transforms")
    p = _transforms_array(pred_transforms, "predicted transforms")
    _same_shape(t, p, "transforms")
    out = np.empty(t.shape[0])
    sx, sy = grid.spacing_mm
    kernels.transform_pixel_error_kernel(t, p, sx, sy, grid.height, grid.width, out)
    return out


def pixel_error_from_transforms(true_transforms, pred_transforms, grid):
    """GPE or LPE (mm) from transforms: mean over frames and pixels (every frame has H·W pixels)."""
    return float(pixel_errors_from_transforms(true_transforms, pred_transforms, grid).mean())


def landmark_error_from_transforms(true_transforms, pred_transforms, landmarks, grid):
    """GLE or LLE (mm) from transforms: mean landmark displacement error."""
    return landmark_error_from_ddfs(
        landmark_ddfs(true_transforms, landmarks, grid), landmark_ddfs(pred_transforms, landmarks, grid)
    )


def landmark_error_from_ddfs(true_ddf, pred_ddf):
    """GLE or LLE (mm) from landmark DDFs (3, K): mean over landmarks of the Euclidean error."""
    t = np.asarray(true_ddf, dtype=np.float64)
    p = np.asarray(pred_ddf, dtype=np.float64)
    _same_shape(t, p, "landmark DDFs")
    if t.ndim != 2 or t.shape[0] != 3:
        raise DataError(f"expected landmark DDFs of shape (3, K), got {t.shape}")
    return float(np.linalg.norm(t - p, axis=0).mean())


def _float32_chunk(array, start, stop):
    return np.ascontiguousarray(array[start:stop], dtype=np.float32)


def pixel_errors_from_ddfs(true_ddf, pred_ddf, *, chunk_frames=DEFAULT_CHUNK_FRAMES):
    """Per-frame mean pixel error between two dense DDFs, read chunk by chunk.

    Parameters
    ----------
    true_ddf, pred_ddf : array-like, shape (n, 3, P)
        ndarrays, memmaps or h5py datasets.
    chunk_frames : int

    Returns
    -------
    ndarray, shape (n,), float64
    """
    _same_shape(true_ddf, pred_ddf, "DDFs")
    if len(true_ddf.shape) != 3 or true_ddf.shape[1] != 3:
        raise DataError(f"expected DDFs of shape (n, 3, P), got {tuple(true_ddf.shape)}")
    out = np.empty(true_ddf.shape[0])
    for start in range(0, true_ddf.shape[0], chunk_frames):
        stop = min(start + chunk_frames, true_ddf.shape[0])
        kernels.ddf_error_kernel(
            _float32_chunk(true_ddf, start, stop), _float32_chunk(pred_ddf, start, stop), out[start:stop]
        )
    return out


def pixel_errors_against_ddf(true_transforms, pred_ddf, grid, *, chunk_frames=DEFAULT_CHUNK_FRAMES):
    """Per-frame pixel errors of a dense predicted DDF against ground-truth transforms.

    The true field is generated chunk by chunk into a reused buffer, so memory stays small.

    Parameters
    ----------
    true_transforms : array_like, shape (n, 4, 4)
    pred_ddf : array-like, shape (n, 3, H·W)
    grid : PixelGrid

    Returns
    -------
    ndarray, shape (n,), float64
    """
    t = _transforms_array(true_transforms, "true transforms")
    expected = (t.shape[0], 3, grid.n_pixels)
    if tuple(pred_ddf.shape) != expected:
        raise DataError(f"expected a DDF of shape {expected}, got {tuple(pred_ddf.shape)}")
    out = np.empty(t.shape[0])
    buffer = np.empty((min(chunk_frames, t.shape[0]), 3, grid.n_pixels), dtype=np.float32)
    for start in range(0, t.shape[0], chunk_frames):
        stop = min(start + chunk_frames, t.shape[0])
        truth = pixel_ddfs(t[start:stop], grid, out=buffer[: stop - start])
        kernels.ddf_error_kernel(truth, _float32_chunk(pred_ddf, start, stop), out[start:stop])
    return out


def scores_2025(errors, identity_errors):
    """TUS-REC2025 per-scan scores: M* = 1 − M / M_identity, final = mean of the four.

    Parameters
    ----------
    errors, identity_errors : mapping
        ``{"GPE": mm, "GLE": mm, "LPE": mm, "LLE": mm}`` of the method and of the all-identity
        prediction for one scan.

    Returns
    -------
    dict
        ``GPE*``, ``GLE*``, ``LPE*``, ``LLE*``, ``score`` (the final score) and the reported
        sub-scores ``global``, ``local``, ``pixel``, ``landmark``.
    """
    norm = {}
    for metric in METRICS:
        reference = identity_errors[metric]
        if not reference > 0:
            raise DataError(f"cannot normalise {metric}: the identity prediction's error is {reference}")
        norm[metric] = 1.0 - errors[metric] / reference
    return _with_subscores(norm)


def _with_subscores(norm):
    return {
        **{f"{m}*": float(v) for m, v in norm.items()},
        "score": float(np.mean([norm[m] for m in METRICS])),
        "global": float(0.5 * (norm["GPE"] + norm["GLE"])),
        "local": float(0.5 * (norm["LPE"] + norm["LLE"])),
        "pixel": float(0.5 * (norm["GPE"] + norm["LPE"])),
        "landmark": float(0.5 * (norm["GLE"] + norm["LLE"])),
    }


def scores_2024(errors_by_method):
    """TUS-REC2024 per-scan scores: min–max across the compared methods, M* = (max − M)/(max − min).

    Parameters
    ----------
    errors_by_method : mapping
        ``{method: {"GPE": mm, ...}}`` for one scan.

    Returns
    -------
    dict
        ``{method: {"GPE*": …, …, "score": …, "global": …, …}}``. Where every method has the same
        error the normalised value is 1 for all.
    """
    result = {}
    for method, errors in errors_by_method.items():
        norm = {}
        for metric in METRICS:
            values = [e[metric] for e in errors_by_method.values()]
            low, high = min(values), max(values)
            norm[metric] = 1.0 if high == low else (high - errors[metric]) / (high - low)
        result[method] = _with_subscores(norm)
    return result
