"""DDF kernels against a plain NumPy version of the contract formulas, and the pixel order by hand."""

import h5py
import numpy as np
import pytest

from speckle_rec.ddf import PixelGrid, PrefaultedOutputs, ddfs_from_transforms, landmark_ddfs, pixel_ddfs
from speckle_rec.errors import DataError

from .conftest import random_landmarks, random_rigid

SPACING = (0.229389190673828, 0.220979690551758)


def reference_pixel_ddf(transforms, height, width, spacing):
    """Contract §3.1/§4.1 written out: grid of 1-based (x, y, 0, 1), x fastest; (T·S·p − S·p)[:3]."""
    rows, cols = np.meshgrid(np.arange(1, height + 1), np.arange(1, width + 1), indexing="ij")
    pixels = np.stack([cols.ravel(), rows.ravel(), np.zeros(rows.size), np.ones(rows.size)])
    q = np.diag([spacing[0], spacing[1], 1.0, 1.0]) @ pixels
    return np.stack([(t @ q - q)[:3] for t in transforms]).astype(np.float32)


def reference_landmark_ddf(transforms, landmarks, spacing):
    """Contract §4.1, transforming each landmark point directly (2024 style)."""
    out = []
    for f, x, y in landmarks:
        q = np.array([spacing[0] * x, spacing[1] * y, 0.0, 1.0])
        out.append((transforms[f - 1] @ q - q)[:3])
    return np.array(out, dtype=np.float32).T


@pytest.mark.parametrize("height, width", [(7, 11), (48, 64), (1, 5)])
def test_pixel_kernel_matches_numpy(rng, height, width):
    transforms = random_rigid(rng, 9, rotation_deg=20, translation_mm=10)
    grid = PixelGrid(height, width, SPACING)
    expected = reference_pixel_ddf(transforms, height, width, SPACING)
    np.testing.assert_allclose(pixel_ddfs(transforms, grid), expected, atol=2e-5)


def test_hand_worked_pixel_order():
    """Rotation by 90° about z: d(x, y) = (−sy·y − sx·x, sx·x − sy·y, 0) at k = (y−1)·W + (x−1)."""
    h, w = 3, 5
    sx, sy = SPACING
    t = np.eye(4)
    t[:2, :2] = [[0, -1], [1, 0]]
    ddf = pixel_ddfs(t[None], PixelGrid(h, w, SPACING))[0]
    for k, (x, y) in {0: (1, 1), 1: (2, 1), 4: (5, 1), 5: (1, 2), 14: (5, 3)}.items():
        np.testing.assert_allclose(ddf[:, k], [-sy * y - sx * x, sx * x - sy * y, 0.0], atol=1e-6)
    # reshaping to (3, H, W) indexes [row, col] = [y − 1, x − 1]
    np.testing.assert_allclose(ddf.reshape(3, h, w)[:, 2, 4], [-sy * 3 - sx * 5, sx * 5 - sy * 3, 0], atol=1e-6)


def test_landmark_kernel_matches_numpy_and_dense_field(rng):
    h, w, n = 20, 30, 8
    transforms = random_rigid(rng, n - 1, rotation_deg=30, translation_mm=20)
    landmarks = random_landmarks(rng, n, h, w, 25)
    grid = PixelGrid(h, w, SPACING)
    got = landmark_ddfs(transforms, landmarks, grid)
    np.testing.assert_allclose(got, reference_landmark_ddf(transforms, landmarks, SPACING), atol=2e-5)
    dense = pixel_ddfs(transforms, grid)
    sampled = np.stack([dense[f - 1, :, (y - 1) * w + (x - 1)] for f, x, y in landmarks], axis=1)
    np.testing.assert_allclose(got, sampled, atol=2e-5)


def test_outputs_into_memmap_and_h5(tmp_path, rng):
    grid = PixelGrid(16, 24, SPACING)
    transforms = random_rigid(rng, 70, rotation_deg=10, translation_mm=5)
    expected = pixel_ddfs(transforms, grid)
    mm = np.lib.format.open_memmap(tmp_path / "gp.npy", mode="w+", dtype=np.float32, shape=expected.shape)
    assert pixel_ddfs(transforms, grid, out=mm) is mm
    np.testing.assert_array_equal(np.load(tmp_path / "gp.npy"), expected)
    with h5py.File(tmp_path / "gp.h5", "w") as f:
        node = f.create_dataset("GP", shape=expected.shape, dtype=np.float32)
        pixel_ddfs(transforms, grid, out=node, chunk_frames=16)
        np.testing.assert_array_equal(node[()], expected)
    # a float64 array is filled through the chunk buffer too
    out64 = np.zeros(expected.shape)
    pixel_ddfs(transforms, grid, out=out64, chunk_frames=7)
    np.testing.assert_array_equal(out64, expected)


def test_four_outputs(rng):
    grid = PixelGrid(6, 10, SPACING)
    g = random_rigid(rng, 4)
    loc = random_rigid(rng, 4)
    lm = random_landmarks(rng, 5, 6, 10, 7)
    gp, gl, lp, ll = ddfs_from_transforms(g, loc, lm, grid)
    assert gp.shape == lp.shape == (4, 3, 60) and gl.shape == ll.shape == (3, 7)
    assert all(a.dtype == np.float32 for a in (gp, gl, lp, ll))
    np.testing.assert_allclose(ll, reference_landmark_ddf(loc, lm, SPACING), atol=2e-5)


def test_outputs_into_prefaulted_arrays(rng):
    grid = PixelGrid(7, 600, SPACING)  # 4200 px: pages of each frame row touched by the thread
    g, loc = random_rigid(rng, 5), random_rigid(rng, 5)
    lm = random_landmarks(rng, 5, 7, 600, 3)
    outputs = PrefaultedOutputs([(5, 3, grid.n_pixels)] * 2)
    gp_out, lp_out = outputs.arrays()
    assert gp_out.dtype == lp_out.dtype == np.float32 and gp_out.shape == (5, 3, 4200)
    gp, gl, lp, ll = ddfs_from_transforms(g, loc, lm, grid, out=(gp_out, lp_out))
    assert gp is gp_out and lp is lp_out
    expected = ddfs_from_transforms(g, loc, lm, grid)
    for got, want in zip((gp, gl, lp, ll), expected):
        np.testing.assert_array_equal(got, want)


def test_prefaulted_outputs_cancel():
    import threading

    outputs = PrefaultedOutputs([(64, 3, 1 << 16)])
    outputs.cancel()
    assert not any(t.name == "speckle_rec-prefault" and t.is_alive() for t in threading.enumerate())


def test_bad_input(rng):
    grid = PixelGrid(4, 5, SPACING)
    with pytest.raises(DataError, match=r"shape \(N-1, 4, 4\)"):
        pixel_ddfs(np.eye(4), grid)
    with pytest.raises(DataError, match=r"expected out of shape \(2, 3, 20\)"):
        pixel_ddfs(random_rigid(rng, 2), grid, out=np.empty((2, 3, 21), np.float32))
    bad = random_rigid(rng, 2)
    bad[1, 0, 3] = np.inf
    with pytest.raises(DataError, match="NaN or inf"):
        pixel_ddfs(bad, grid)
    with pytest.raises(DataError, match=r"1\.\.2"):
        landmark_ddfs(random_rigid(rng, 2), np.array([[0, 1, 1]]), grid)
    with pytest.raises(DataError, match="invalid pixel grid"):
        PixelGrid(0, 5, SPACING)
