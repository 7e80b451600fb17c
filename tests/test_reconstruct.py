"""`speckle-rec reconstruct` and the first-direction prior learnt by `calibrate`, on small simulated scans."""

import h5py
import numpy as np
import pytest

from cli.main import main
from speckle_rec.calibrate import learn_direction_prior, save_calibration
from speckle_rec.calibration import Calibration
from speckle_rec.decorrelation import DecorrelationModel
from speckle_rec.direction import DirectionPrior, first_direction, mirror
from speckle_rec.errors import DataError
from speckle_rec.io import ScanData, open_dataset, write_dataset
from speckle_rec.prediction import open_prediction, prediction_path
from speckle_rec.simulate.dataset import simulate_dataset
from speckle_rec.simulate.probe import Probe

from .conftest import make_scan

PROBE = Probe.fit_image(240, 320)
POINTS = np.array([(x, y) for x in (15.0, 32.0, 48.0) for y in (10.0, 25.0, 40.0)])


def scan_moving(rng, subject, name, direction, n_frames=12):
    """A tracked scan whose frames step 0.4 mm along the image normal, first towards ``direction``."""
    image_to_tool = Calibration.default().image_to_tool
    start = np.eye(4)
    start[:3, 3] = rng.normal(size=3) * 50.0
    tforms = np.empty((n_frames, 4, 4))
    for k in range(n_frames):
        frame_to_first = np.eye(4)
        frame_to_first[2, 3] = direction * 0.4 * k
        tforms[k] = start @ image_to_tool @ frame_to_first @ np.linalg.inv(image_to_tool)
    scan = make_scan(rng, subject, name, n_frames=n_frames)
    return ScanData(scan.subject, scan.name, scan.frames, tforms, scan.landmarks)


def test_learn_direction_prior_from_tforms(tmp_path, rng):
    scans = [scan_moving(rng, f"{s:03d}", "LH_Per_L_DtP", -1) for s in range(3)]
    scans += [scan_moving(rng, f"{s:03d}", "LH_rotation", d) for s, d in enumerate((1, -1, 1))]
    scans.append(scan_moving(rng, "003", "LH_rotation", 1, n_frames=3))  # never moves 1 mm: not counted
    root = write_dataset(tmp_path / "train", scans, layout="train")
    prior = learn_direction_prior(open_dataset(root))
    assert prior.counts == {"LH_Per_L_DtP": [0, 3], "LH_rotation": [2, 1]}
    assert prior.choose("RH_Per_L_DtP") == (-1, "name, either hand")
    assert prior.choose("LH_rotation")[1] != "name"  # 2 of 3 is not decisive
    untracked = write_dataset(tmp_path / "test", [make_scan(rng, "050", "LH_rotation", tracked=False)],
                              layout="test")
    with pytest.raises(DataError, match="calibrate needs tracked scans"):
        learn_direction_prior(open_dataset(untracked))


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """A test-layout folder with one 120-frame perpendicular sweep (240 x 320), ground truth in transfs/."""
    root = tmp_path_factory.mktemp("recon") / "data"
    simulate_dataset(root, protocol="linear", subjects=("050",), n_frames=120, layout="test", probe=PROBE, seed=5,
                     hands=("LH",), planes=("per",), directions=("DtP",))
    return root


def predicted_globals(pred_dir):
    with h5py.File(prediction_path(pred_dir, "050", "LH_Per_L_DtP"), "r") as handle:
        return handle["global_transforms"][()]


def test_reconstruct_uses_the_calibration_files_prior(sweep_dir, tmp_path, capsys):
    calib = tmp_path / "calib.json"
    save_calibration(calib, DecorrelationModel.default(), prior=DirectionPrior({"LH_Per_L_DtP": [0, 5]}))
    assert main(["reconstruct", str(sweep_dir), "-o", str(tmp_path / "prior"), "--calibration", str(calib),
                 "--threads", "2"]) == 0
    err = capsys.readouterr().err
    assert "LH_Per_L_DtP -1 (name)" in err and "reconstructed 1 scan(s)" in err
    assert main(["reconstruct", str(sweep_dir), "-o", str(tmp_path / "convention"), "--quiet"]) == 0
    with_prior, convention = predicted_globals(tmp_path / "prior"), predicted_globals(tmp_path / "convention")
    assert first_direction(with_prior, POINTS, threshold_mm=0.5) == -1
    assert first_direction(convention, POINTS, threshold_mm=0.5) == 1
    # the same trajectory up to the mirror through frame 0's plane
    np.testing.assert_allclose(with_prior, mirror(convention), atol=1e-6)
    # the file says how it was made
    n, h, w = open_dataset(sweep_dir).scans[0].shape()
    with open_prediction(prediction_path(tmp_path / "prior", "050", "LH_Per_L_DtP"), n_frames=n,
                         n_pixels=h * w, n_landmarks=0) as prediction:
        notes = prediction.diagnostics
    assert notes["signs"]["first_direction"] == -1 and notes["signs"]["first_direction_basis"] == "name"
    assert notes["pivot"] is False and notes["frames"] == 120 and set(notes["seconds"]) >= {"measure", "adjust"}
    # a rerun skips the finished scan
    assert main(["reconstruct", str(sweep_dir), "-o", str(tmp_path / "prior"), "--calibration", str(calib)]) == 0
    assert "reconstructed 0 scan(s), skipped 1 finished" in capsys.readouterr().err


def test_reconstruct_slide_and_level_stages_are_on_unless_switched_off(sweep_dir, tmp_path):
    n, h, w = open_dataset(sweep_dir).scans[0].shape()
    notes = {}
    for name, extra in (("default", []), ("no_slide", ["--no-slide"]), ("no_level", ["--no-level"])):
        assert main(["reconstruct", str(sweep_dir), "-o", str(tmp_path / name), "--quiet", *extra]) == 0
        with open_prediction(prediction_path(tmp_path / name, "050", "LH_Per_L_DtP"), n_frames=n,
                             n_pixels=h * w, n_landmarks=0) as prediction:
            notes[name] = prediction.diagnostics["signs"]["slide"], prediction.diagnostics["level"]
    assert notes["default"][0] == {"skipped": "no fixed skin contact"}  # reached, but it is for fanning scans
    assert notes["no_slide"][0] is None
    assert notes["default"][1]["fits"] >= 1 and abs(notes["default"][1]["net_travel_mm"]) > 20.0
    assert notes["no_level"][1] == {"skipped": "level_sweeps=False"}


def test_reconstruct_bad_calibration_is_one_line(sweep_dir, tmp_path, capsys):
    calib = tmp_path / "calib.json"
    save_calibration(calib, DecorrelationModel.default())
    text = calib.read_text().rstrip()[:-1] + ', "direction_prior": {"counts": {"LH_rotation": [1]}}}'
    calib.write_text(text)
    out = tmp_path / "pred"
    assert main(["reconstruct", str(sweep_dir), "-o", str(out), "--calibration", str(calib)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "calib.json: bad direction_prior" in err[0], err
    assert not out.exists()


def test_predict_ddfs_matches_the_reconstructed_transforms(sweep_dir, tmp_path):
    import speckle_rec
    from speckle_rec.ddf import PixelGrid, pixel_ddfs
    from speckle_rec.reconstruct import reconstruct_scan

    dataset = open_dataset(sweep_dir)
    scan = dataset.scans[0]
    frames, landmarks = scan.read_frames()[:60], scan.read_landmarks()
    landmarks = landmarks[landmarks[:, 0] < 60]
    calib_csv = sweep_dir / "calib_matrix.csv"
    gp, gl, lp, ll = speckle_rec.predict_ddfs(frames, landmarks, str(calib_csv), "cpu")
    n, h, w = frames.shape
    assert gp.shape == lp.shape == (n - 1, 3, h * w) and gl.shape == ll.shape == (3, len(landmarks))
    assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in (gp, gl, lp, ll))
    calibration = dataset.calibration()
    result = reconstruct_scan(frames, spacing_mm=calibration.spacing_mm)
    frame_to_first, frame_to_previous = result.frame_to_first, result.frame_to_previous
    grid = PixelGrid.from_calibration(calibration, h, w)
    np.testing.assert_allclose(gp, pixel_ddfs(frame_to_first, grid), atol=1e-4)
    np.testing.assert_allclose(lp, pixel_ddfs(frame_to_previous, grid), atol=1e-4)
    # landmark k reads its frame's row of GP at its pixel (1-based x, y; row-major, x fastest)
    k = 0
    f, x, y = landmarks[k]
    np.testing.assert_allclose(gl[:, k], gp[f - 1, :, (y - 1) * w + (x - 1)], atol=1e-4)
    # a calibration file's curves are used; the packaged ones give the same result
    calib = tmp_path / "calib.json"
    save_calibration(calib, DecorrelationModel.default())
    again = speckle_rec.predict_ddfs(frames, landmarks, str(calib_csv), calibration=calib)
    np.testing.assert_allclose(again[0], gp, atol=1e-5)
    with pytest.raises(DataError, match="missing.json: decorrelation model file not found"):
        speckle_rec.predict_ddfs(frames, landmarks, str(calib_csv), calibration=tmp_path / "missing.json")
    bad = landmarks.copy()
    bad[0, 0] = 0
    with pytest.raises(DataError, match="landmark"):
        speckle_rec.predict_ddfs(frames, bad, str(calib_csv))


def test_predict_ddfs_failure_stops_the_output_prefault(sweep_dir, monkeypatch):
    import threading

    import speckle_rec
    from speckle_rec import reconstruct

    asked = {}

    def failing(*args, **kwargs):
        asked.update(kwargs)
        raise DataError("estimation failed")

    monkeypatch.setattr(reconstruct, "reconstruct_scan", failing)
    scan = open_dataset(sweep_dir).scans[0]
    frames, landmarks = scan.read_frames()[:20], scan.read_landmarks()
    early, calib = landmarks[landmarks[:, 0] < 20], str(sweep_dir / "calib_matrix.csv")
    for on in (True, False):
        with pytest.raises(DataError, match="estimation failed"):
            off = {} if on else {"slide": False, "level_sweeps": False}
            speckle_rec.predict_ddfs(frames, early, calib, **off)
        assert not any(t.name == "speckle_rec-prefault" and t.is_alive() for t in threading.enumerate())
        assert asked["slide"] is on and asked["level_sweeps"] is on  # on by default; the keywords reach it
