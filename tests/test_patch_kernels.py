"""The patch NCC kernel against a plain NumPy version of the same formula."""

import numpy as np
import pytest

from speckle_rec._patch_kernels import patch_ncc_kernel


def _bilinear(image, u, v):
    iu = np.minimum(np.floor(u).astype(int), image.shape[1] - 2)
    iv = np.minimum(np.floor(v).astype(int), image.shape[0] - 2)
    du, dv = u - iu, v - iv
    g = image.astype(np.float64)
    return ((1 - dv) * ((1 - du) * g[iv, iu] + du * g[iv, iu + 1])
            + dv * ((1 - du) * g[iv + 1, iu] + du * g[iv + 1, iu + 1]))


def _reference(frames, fixed_index, moving_index, affines, mask, rows, cols, height, width):
    """Pearson correlation of each fixed patch with the bilinearly resampled moving frame."""
    h, w = frames.shape[1:]
    rho = np.full((len(fixed_index), len(rows)), np.nan)
    mean = np.empty_like(rho)
    for m, (fi, gi) in enumerate(zip(fixed_index, moving_index)):
        for p, (r0, c0) in enumerate(zip(rows, cols)):
            rr, cc = np.mgrid[r0:r0 + height, c0:c0 + width]
            u = affines[m, 0, 0] * cc + affines[m, 0, 1] * rr + affines[m, 0, 2]
            v = affines[m, 1, 0] * cc + affines[m, 1, 1] * rr + affines[m, 1, 2]
            fixed = frames[fi, rr, cc].astype(np.float64)
            mean[m, p] = fixed.mean()
            corners = [(u[a, b], v[a, b]) for a in (0, -1) for b in (0, -1)]
            if not all(0 <= cu <= w - 1 and 0 <= cv <= h - 1 and mask[int(cv + 0.5), int(cu + 0.5)]
                       for cu, cv in corners):
                continue
            moving = _bilinear(frames[gi], u, v)
            if fixed.std() > 0 and moving.std() > 0:
                rho[m, p] = np.corrcoef(fixed.ravel(), moving.ravel())[0, 1]
    return rho, mean


def _run(frames, fixed_index, moving_index, affines, mask, rows, cols, height, width):
    rho = np.empty((len(fixed_index), len(rows)))
    mean = np.empty_like(rho)
    patch_ncc_kernel(frames, np.asarray(fixed_index, np.int64), np.asarray(moving_index, np.int64),
                     np.asarray(affines, np.float64), mask, np.asarray(rows, np.int64), np.asarray(cols, np.int64),
                     height, width, rho, mean)
    return rho, mean


def _affine(angle, tx, ty, center):
    c, s = np.cos(angle), np.sin(angle)
    a = np.array([[c, -s], [s, c]])
    return np.hstack([a, (np.asarray(center) + [tx, ty] - a @ center)[:, None]])


def test_kernel_matches_numpy(rng):
    frames = rng.integers(0, 256, size=(3, 60, 80), dtype=np.uint8)
    mask = np.ones((60, 80), bool)
    mask[:, 70:] = False  # samples landing here make the patch invalid
    rows = np.array([0, 10, 20, 40, 43, 5])
    cols = np.array([0, 30, 50, 10, 60, 64])
    affines = np.stack([_affine(0.0, 0.0, 0.0, (40, 30)), _affine(0.03, 1.3, -0.7, (40, 30)),
                        _affine(-0.02, -2.25, 0.4, (40, 30))])
    fixed_index, moving_index = [0, 0, 2], [0, 1, 1]
    rho, mean = _run(frames, fixed_index, moving_index, affines, mask, rows, cols, 12, 15)
    want_rho, want_mean = _reference(frames, fixed_index, moving_index, affines, mask, rows, cols, 12, 15)
    np.testing.assert_array_equal(np.isnan(rho), np.isnan(want_rho))
    np.testing.assert_allclose(rho[~np.isnan(rho)], want_rho[~np.isnan(want_rho)], atol=1e-9)
    np.testing.assert_allclose(mean, want_mean, atol=1e-12)
    # identical frames under the identity give exactly 1 wherever the patch is defined
    assert np.allclose(rho[0][np.isfinite(rho[0])], 1.0)
    assert np.isfinite(rho).sum() >= 8 and np.isnan(rho).sum() >= 3


def test_kernel_float_frames_and_threads(rng):
    import numba

    frames = rng.normal(size=(2, 40, 50))
    mask = np.ones((40, 50), bool)
    rows, cols = np.array([3, 17, 20]), np.array([4, 9, 30])
    affines = _affine(0.01, 0.4, 0.3, (25, 20))[None]
    want, _ = _reference(frames, [0], [1], affines, mask, rows, cols, 9, 11)
    previous = numba.get_num_threads()
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            rho, _ = _run(frames, [0], [1], affines, mask, rows, cols, 9, 11)
            np.testing.assert_allclose(rho, want, atol=1e-9)
    finally:
        numba.set_num_threads(previous)


@pytest.mark.parametrize("value", [0, 255])
def test_constant_patch_is_nan(value):
    frames = np.full((2, 20, 20), value, np.uint8)
    frames[1] = np.arange(400, dtype=np.uint8).reshape(20, 20)
    mask = np.ones((20, 20), bool)
    rho, mean = _run(frames, [0, 1], [1, 0], np.stack([_affine(0, 0, 0, (10, 10))] * 2), mask,
                     np.array([2]), np.array([2]), 8, 8)
    assert np.isnan(rho).all()
    assert mean[0, 0] == value
