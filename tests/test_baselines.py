import numpy as np
import pytest

from speckle_rec.baselines import constant_velocity_transforms, identity_transforms, mean_local_params
from speckle_rec.errors import DataError
from speckle_rec.transforms import matrices_from_params


def test_constant_velocity_chains_the_mean_step():
    step = np.array([0.0, 0.0, np.radians(1.0), 0.5, 0.0, 0.1])
    locals_a = np.tile(matrices_from_params(step), (9, 1, 1))
    params = mean_local_params([locals_a, locals_a[:3]])
    np.testing.assert_allclose(params, step, atol=1e-12)
    g, loc = constant_velocity_transforms(5, params)
    np.testing.assert_allclose(g[-1], np.linalg.matrix_power(matrices_from_params(step), 4), atol=1e-12)
    np.testing.assert_allclose(loc[2], matrices_from_params(step), atol=1e-12)
    # a 4-step rotation of 1 degree about z turns by 4 degrees in total
    assert np.degrees(np.arctan2(g[-1][1, 0], g[-1][0, 0])) == pytest.approx(4.0)


def test_identity_and_errors():
    assert identity_transforms(3).shape == (2, 4, 4)
    with pytest.raises(DataError, match="at least 2 frames"):
        identity_transforms(1)
    with pytest.raises(DataError, match="at least one tracked scan"):
        mean_local_params([])
