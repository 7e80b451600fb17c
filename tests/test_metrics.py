import numpy as np
import pytest

from speckle_rec.ddf import PixelGrid, landmark_ddfs, pixel_ddfs
from speckle_rec.errors import DataError
from speckle_rec.metrics import (
    landmark_error_from_ddfs,
    landmark_error_from_transforms,
    pixel_error_from_transforms,
    pixel_errors_against_ddf,
    pixel_errors_from_ddfs,
    scores_2024,
    scores_2025,
)

from .conftest import random_landmarks, random_rigid
from .test_ddf import SPACING, reference_pixel_ddf


def test_transform_errors_equal_dense_definition(rng):
    grid = PixelGrid(30, 44, SPACING)
    truth = random_rigid(rng, 12, rotation_deg=15, translation_mm=8)
    pred = truth @ random_rigid(rng, 12, rotation_deg=2, translation_mm=1)
    dense_t = reference_pixel_ddf(truth, 30, 44, SPACING)
    dense_p = reference_pixel_ddf(pred, 30, 44, SPACING)
    expected = np.linalg.norm(dense_t.astype(np.float64) - dense_p, axis=1).mean()
    assert pixel_error_from_transforms(truth, pred, grid) == pytest.approx(expected, rel=1e-5)
    assert pixel_errors_from_ddfs(dense_t, dense_p, chunk_frames=5).mean() == pytest.approx(expected, rel=1e-6)
    assert pixel_errors_against_ddf(truth, dense_p, grid, chunk_frames=4).mean() == pytest.approx(expected, rel=1e-5)
    lm = random_landmarks(rng, 13, 30, 44, 20)
    by_ddf = landmark_error_from_ddfs(landmark_ddfs(truth, lm, grid), landmark_ddfs(pred, lm, grid))
    assert landmark_error_from_transforms(truth, pred, lm, grid) == pytest.approx(by_ddf)


def test_pixel_order_mistakes_show_in_pixel_error_only(rng):
    """A transposed or 0-based pixel grid ruins GPE but not GLE (a real 2025 submission did this)."""
    h, w = 48, 64
    grid = PixelGrid(h, w, SPACING)
    truth = random_rigid(rng, 6, rotation_deg=20, translation_mm=10)
    lm = random_landmarks(rng, 7, h, w, 30)
    good = pixel_ddfs(truth, grid)
    transposed = good.reshape(6, 3, h, w).transpose(0, 1, 3, 2).reshape(6, 3, h * w).copy()
    zero_based = reference_pixel_ddf(truth @ _shift(-SPACING[0], -SPACING[1]), h, w, SPACING)
    assert pixel_errors_from_ddfs(good, good).max() == 0.0
    assert pixel_errors_from_ddfs(good, transposed).mean() > 1.0
    assert pixel_errors_from_ddfs(good, zero_based).mean() > 0.01
    assert landmark_error_from_transforms(truth, truth, lm, grid) == 0.0


def _shift(dx, dy):
    t = np.eye(4)
    t[:2, 3] = dx, dy
    return t


def test_scores_2025_identity_zero_truth_one():
    identity = {"GPE": 20.0, "GLE": 18.0, "LPE": 0.4, "LLE": 0.3}
    assert scores_2025(identity, identity)["score"] == 0.0
    perfect = scores_2025({k: 0.0 for k in identity}, identity)
    assert perfect["score"] == 1.0 and perfect["global"] == 1.0 and perfect["landmark"] == 1.0
    half = scores_2025({"GPE": 10.0, "GLE": 18.0, "LPE": 0.2, "LLE": 0.6}, identity)
    assert half["GPE*"] == 0.5 and half["LLE*"] == -1.0
    assert half["score"] == pytest.approx((0.5 + 0 + 0.5 - 1) / 4)
    assert half["score"] == pytest.approx(0.5 * (half["global"] + half["local"]))
    assert half["score"] == pytest.approx(0.5 * (half["pixel"] + half["landmark"]))
    with pytest.raises(DataError, match="cannot normalise GPE"):
        scores_2025(identity, {**identity, "GPE": 0.0})


def test_scores_2024_min_max():
    errors = {
        "a": {"GPE": 1.0, "GLE": 1.0, "LPE": 0.1, "LLE": 0.1},
        "b": {"GPE": 3.0, "GLE": 2.0, "LPE": 0.3, "LLE": 0.1},
        "c": {"GPE": 2.0, "GLE": 3.0, "LPE": 0.2, "LLE": 0.1},
    }
    s = scores_2024(errors)
    assert s["a"]["score"] == 1.0
    assert s["b"]["GPE*"] == 0.0 and s["c"]["GPE*"] == 0.5 and s["b"]["GLE*"] == 0.5
    assert s["b"]["LLE*"] == 1.0  # all equal → 1 for all
    assert s["b"]["score"] == pytest.approx((0 + 0.5 + 0 + 1) / 4)


def test_metric_shape_errors(rng):
    grid = PixelGrid(4, 4, SPACING)
    with pytest.raises(DataError, match="equal shapes"):
        pixel_error_from_transforms(random_rigid(rng, 3), random_rigid(rng, 2), grid)
    with pytest.raises(DataError, match=r"expected a DDF of shape \(3, 3, 16\)"):
        pixel_errors_against_ddf(random_rigid(rng, 3), np.zeros((3, 3, 15), np.float32), grid)
    with pytest.raises(DataError, match=r"\(3, K\)"):
        landmark_error_from_ddfs(np.zeros((2, 4)), np.zeros((2, 4)))
