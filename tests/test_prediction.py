import h5py
import numpy as np
import pytest

from speckle_rec.ddf import PixelGrid, ddfs_from_transforms
from speckle_rec.errors import DataError
from speckle_rec.prediction import open_prediction, write_prediction
from speckle_rec.transforms import globals_from_locals, locals_from_globals

from .conftest import random_landmarks, random_rigid

GRID = PixelGrid(6, 9, (0.23, 0.22))


def test_transforms_round_trip_and_derived_locals(tmp_path, rng):
    local = random_rigid(rng, 7, rotation_deg=3, translation_mm=1)
    path = tmp_path / "p" / "000" / "LH_rotation.h5"
    write_prediction(path, local_transforms=local, wall_time_s=1.5)
    with open_prediction(path, n_frames=8, n_pixels=54, n_landmarks=3) as p:
        np.testing.assert_allclose(p.local_transforms, local, atol=1e-12)
        np.testing.assert_allclose(p.global_transforms, globals_from_locals(local), atol=1e-12)
        assert p.wall_time_s == 1.5 and not p.has_ddfs and p.diagnostics is None


def test_diagnostics_round_trip_and_bad_attribute(tmp_path, rng):
    path = tmp_path / "p.h5"
    notes = {"pivot": True, "seconds": {"measure": 1.25}, "signs": {"first_direction": -1}}
    write_prediction(path, global_transforms=random_rigid(rng, 3), diagnostics=notes)
    with open_prediction(path, n_frames=4, n_pixels=54, n_landmarks=0) as p:
        assert p.diagnostics == notes
    with h5py.File(path, "a") as handle:
        handle.attrs["diagnostics"] = "{not json"
    with pytest.raises(DataError, match="p.h5: attribute diagnostics is not JSON"):
        with open_prediction(path, n_frames=4, n_pixels=54, n_landmarks=0):
            pass


def test_ddfs_from_grid_equal_in_memory(tmp_path, rng):
    g = globals_from_locals(random_rigid(rng, 5))
    lm = random_landmarks(rng, 6, GRID.height, GRID.width, 4)
    path = tmp_path / "a.h5"
    write_prediction(path, global_transforms=g, ddf_grid=GRID, landmarks=lm, chunk_frames=2)
    expected = ddfs_from_transforms(g, locals_from_globals(g), lm, GRID)
    with open_prediction(path, n_frames=6, n_pixels=54, n_landmarks=4) as p:
        for key, value in zip(("GP", "GL", "LP", "LL"), expected):
            np.testing.assert_allclose(np.asarray(getattr(p, key)[()]), value, atol=1e-5)




def test_learned_model_outputs_saved(tmp_path, rng):
    gp = rng.normal(size=(4, 3, 54)).astype(np.float32)
    gl = rng.normal(size=(3, 5)).astype(np.float32)
    path = tmp_path / "m.h5"
    write_prediction(path, GP=gp, GL=gl, LP=gp, LL=gl)
    with open_prediction(path, n_frames=5, n_pixels=54, n_landmarks=5) as p:
        assert p.has_ddfs and not p.has_transforms
        np.testing.assert_array_equal(p.GP[()], gp)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "nothing to write"),
        (dict(GP=np.zeros((2, 3, 4))), "give all four DDFs or none"),
        (dict(GP=np.zeros((2, 3, 4)), LP=np.zeros((2, 3, 5)), GL=np.zeros((3, 2)), LL=np.zeros((3, 2))),
         "GP and LP of one shape"),
        (dict(GP=np.full((2, 3, 4), np.nan), LP=np.zeros((2, 3, 4)), GL=np.zeros((3, 2)), LL=np.zeros((3, 2))),
         "GP contains NaN"),
        (dict(global_transforms=np.full((2, 4, 4), np.nan)), "contains NaN"),
    ],
)
def test_bad_writes_leave_nothing(tmp_path, kwargs, message):
    path = tmp_path / "x" / "s.h5"
    with pytest.raises(DataError, match=message):
        write_prediction(path, **kwargs)
    assert not path.exists() and not list(tmp_path.rglob("*.h5*"))


def test_frame_count_mismatch_names_file(tmp_path, rng):
    path = tmp_path / "s.h5"
    write_prediction(path, global_transforms=globals_from_locals(random_rigid(rng, 5)))
    with pytest.raises(DataError, match="global_transforms has 5 rows but the scan has 9 frames") as info:
        with open_prediction(path, n_frames=9, n_pixels=54, n_landmarks=3):
            pass
    assert str(path) in str(info.value)
    gp = np.zeros((5, 3, 54), np.float32)
    write_prediction(path, GP=gp, LP=gp, GL=np.zeros((3, 3)), LL=np.zeros((3, 3)))
    with pytest.raises(DataError, match=r"expected GP of shape \(8, 3, 54\)"):
        with open_prediction(path, n_frames=9, n_pixels=54, n_landmarks=3):
            pass
