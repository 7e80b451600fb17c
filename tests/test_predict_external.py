"""`speckle-rec predict` runs any challenge predict_ddfs and saves what `evaluate` compares."""

import json
import re
import textwrap

import pytest

from cli.main import main
from speckle_rec.errors import DataError
from speckle_rec.external import load_function
from speckle_rec.io import open_dataset
from speckle_rec.prediction import open_prediction, prediction_path

SUBMISSION = textwrap.dedent('''
    import numpy as np

    def predict_ddfs(frames, landmark, data_path_calib, device):
        n, h, w = frames.shape
        assert str(data_path_calib).endswith("calib_matrix.csv") and device is not None
        gp = np.zeros((n - 1, 3, h * w), np.float32)
        return gp, np.zeros((3, len(landmark)), np.float32), gp.copy(), np.zeros((3, len(landmark)), np.float32)

    def predict_ddfs_2024(frames, landmark, data_path_calib):
        return predict_ddfs(frames, landmark, data_path_calib, "cpu")

    def wrong_shape(frames, landmark, data_path_calib, device):
        gp, gl, lp, ll = predict_ddfs(frames, landmark, data_path_calib, device)
        return gp[:, :, :-1], gl, lp, ll

    def crashes(frames, landmark, data_path_calib, device):
        raise RuntimeError("CUDA out of memory")
''')


@pytest.fixture
def submission(tmp_path):
    path = tmp_path / "submission" / "predict_ddfs.py"
    path.parent.mkdir()
    path.write_text(SUBMISSION)
    return path


def test_identity_submission_scores_zero_with_runtime(train_dir, tmp_path, submission, capsys):
    out = tmp_path / "zeros"
    assert main(["predict", str(train_dir), "--function", f"{submission}:predict_ddfs", "-o", str(out),
                 "--quiet"]) == 0
    scan = open_dataset(train_dir).scans[0]
    n, h, w = scan.shape()
    with open_prediction(prediction_path(out, scan.subject, scan.name), n_frames=n, n_pixels=h * w,
                         n_landmarks=20) as p:
        assert p.has_ddfs and p.wall_time_s >= 0
    assert main(["evaluate", str(out), "--data", str(train_dir), "--quiet", "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())["methods"]["zeros"]
    assert result["mean"]["score"] == pytest.approx(0.0, abs=1e-6)
    assert result["mean"]["GPE"] == pytest.approx(
        json.loads((tmp_path / "r.json").read_text())["methods"]["identity"]["mean"]["GPE"], rel=1e-5)
    assert "wall_time_s" in result["mean"]
    # a rerun skips finished scans
    capsys.readouterr()
    assert main(["predict", str(train_dir), "--function", f"{submission}:predict_ddfs", "-o", str(out),
                 "--quiet"]) == 0
    assert "predicted 0 scan(s), skipped 4 finished" in capsys.readouterr().err


def test_2024_signature(train_dir, tmp_path, submission):
    assert main(["predict", str(train_dir), "--function", f"{submission}:predict_ddfs_2024",
                 "-o", str(tmp_path / "p24"), "--quiet", "--scans", "000/*"]) == 0
    assert len(list((tmp_path / "p24").rglob("*.h5"))) == 2


@pytest.mark.parametrize("name, message", [
    ("wrong_shape", r"expected GP of shape \(11, 3, 960\), got \(11, 3, 959\)"),
    ("crashes", "RuntimeError: CUDA out of memory"),
])
def test_failing_submission_reported_per_scan(train_dir, tmp_path, submission, capsys, name, message):
    out = tmp_path / name
    assert main(["predict", str(train_dir), "--function", f"{submission}:{name}", "-o", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "4 failed" in err and err.count("failed: ") == 4
    assert re.search(message, err)
    assert not list(out.rglob("*.h5*"))


def test_load_function_errors(tmp_path, submission):
    with pytest.raises(DataError, match="expected MODULE:CALLABLE"):
        load_function("predict_ddfs")
    with pytest.raises(DataError, match="has no callable 'nope'"):
        load_function(f"{submission}:nope")
    with pytest.raises(DataError, match="cannot import no_such_module_xyz"):
        load_function("no_such_module_xyz:f")
    assert callable(load_function("speckle_rec:predict_ddfs"))
