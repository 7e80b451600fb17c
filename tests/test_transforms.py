import numpy as np
import pytest

from speckle_rec.errors import DataError
from speckle_rec.transforms import (
    check_rigid,
    globals_from_locals,
    invert_rigid,
    locals_from_globals,
    matrices_from_params,
    params_from_matrices,
    transforms_from_tforms,
)

from .conftest import random_rigid, random_walk_tforms


def test_ground_truth_matches_contract_formula(rng, calibration):
    tforms = random_walk_tforms(rng, 30)
    c = calibration.image_to_tool
    frame_to_first, frame_to_previous = transforms_from_tforms(tforms.astype(np.float32), c)
    inv = np.linalg.inv
    f = tforms.astype(np.float32).astype(np.float64)
    for i in range(1, 30):
        np.testing.assert_allclose(frame_to_first[i - 1], inv(c) @ inv(f[0]) @ f[i] @ c, atol=1e-9)
        np.testing.assert_allclose(frame_to_previous[i - 1], inv(c) @ inv(f[i - 1]) @ f[i] @ c, atol=1e-9)
    assert frame_to_first.dtype == np.float64 and frame_to_first.shape == (29, 4, 4)


def test_global_is_chained_locals_and_back(rng, calibration):
    frame_to_first, frame_to_previous = transforms_from_tforms(random_walk_tforms(rng, 50), calibration.image_to_tool)
    np.testing.assert_allclose(globals_from_locals(frame_to_previous), frame_to_first, atol=1e-9)
    np.testing.assert_allclose(locals_from_globals(frame_to_first), frame_to_previous, atol=1e-9)


def test_inverse_and_params_round_trip(rng):
    m = random_rigid(rng, 20, rotation_deg=90, translation_mm=50)
    np.testing.assert_allclose(invert_rigid(m) @ m, np.broadcast_to(np.eye(4), m.shape), atol=1e-12)
    np.testing.assert_allclose(matrices_from_params(params_from_matrices(m)), m, atol=1e-12)


def test_check_rigid_errors(rng):
    m = random_rigid(rng, 5)
    with pytest.raises(DataError, match=r"expected tforms of shape \(\.\.\., 4, 4\), got \(5, 3, 4\) in x.h5|x.h5"):
        check_rigid(m[:, :3, :], name="tforms", source="x.h5")
    bad = m.copy()
    bad[3, 0, 0] *= 1.1
    with pytest.raises(DataError, match=r"tforms\[3\] is not a rigid transform"):
        check_rigid(bad, name="tforms")
    bad = m.copy()
    bad[2, 1, 3] = np.nan
    with pytest.raises(DataError, match=r"tforms\[2\] contains NaN"):
        check_rigid(bad, name="tforms")
    mirrored = m.copy()
    mirrored[1, :3, 0] *= -1
    with pytest.raises(DataError, match=r"tforms\[1\] is not a rigid"):
        check_rigid(mirrored, name="tforms")


def test_transforms_from_tforms_needs_two_frames(rng, calibration):
    with pytest.raises(DataError, match="at least 2 frames"):
        transforms_from_tforms(random_rigid(rng, 1), calibration.image_to_tool)
