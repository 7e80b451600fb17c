"""`speckle-rec info` and `evaluate` end to end on small synthetic folders."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from cli.main import main
from speckle_rec.ddf import PixelGrid
from speckle_rec.io import open_dataset
from speckle_rec.prediction import prediction_path, write_prediction
from speckle_rec.transforms import matrices_from_params, transforms_from_tforms


def write_method(data_dir, pred_dir, *, noise=0.0, ddf=False, skip=(), seed=0):
    """Ground truth (optionally perturbed) written as a prediction folder."""
    rng = np.random.default_rng(seed)
    ds = open_dataset(data_dir)
    calib = ds.calibration()
    for scan in ds.scans:
        if scan.key in skip:
            continue
        g, _ = transforms_from_tforms(scan.read_tforms(), calib.image_to_tool)
        g = g @ matrices_from_params(rng.normal(scale=noise, size=(len(g), 6)))
        n, h, w = scan.shape()
        extra = dict(ddf_grid=PixelGrid.from_calibration(calib, h, w), landmarks=scan.read_landmarks()) if ddf else {}
        write_prediction(prediction_path(pred_dir, scan.subject, scan.name), global_transforms=g,
                         wall_time_s=0.5, **extra)
    return pred_dir


def test_info(train_dir, capsys, tmp_path):
    assert main(["info", str(train_dir), "--quiet", "--json", str(tmp_path / "i.json")]) == 0
    out = capsys.readouterr().out
    assert "train layout, 2 subject(s), 4 scan(s), 48 frames" in out and "000/LH_rotation" in out
    info = json.loads((tmp_path / "i.json").read_text())
    scan = info["scans"][0]
    assert scan["frames"] == 12 and scan["height"] == 24 and scan["width"] == 40 and scan["GPE"] > 0


def test_evaluate_truth_identity_and_noise(train_dir, tmp_path, capsys):
    truth = write_method(train_dir, tmp_path / "truth")
    noisy = write_method(train_dir, tmp_path / "noisy", noise=0.01, skip={"001/RH_rotation"})
    dense = write_method(train_dir, tmp_path / "dense", noise=0.01, ddf=True)
    rc = main(["evaluate", str(truth), str(noisy), str(dense), "--data", str(train_dir), "--quiet",
               "--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv")])
    assert rc == 0
    captured = capsys.readouterr()
    assert "noisy has no prediction for 1 of 4 scan(s), e.g. 001/RH_rotation" in captured.err
    table = captured.out.splitlines()
    assert table[0].split()[:2] == ["method", "GPE"] and any(r.startswith("identity") for r in table)
    results = json.loads((tmp_path / "r.json").read_text())["methods"]
    assert set(results) == {"truth", "noisy", "dense", "identity"}
    assert results["truth"]["mean"]["score"] == pytest.approx(1.0)
    assert results["truth"]["mean"]["GPE"] == pytest.approx(0.0, abs=1e-4)
    assert results["identity"]["mean"]["score"] == 0.0
    assert results["identity"]["mean"]["GPE"] > 0 and results["identity"]["mean"]["LLE"] > 0
    assert len(results["noisy"]["scans"]) == 3 and results["noisy"]["missing"] == ["001/RH_rotation"]
    assert 0 < results["noisy"]["mean"]["score"] < 1
    assert results["truth"]["mean"]["score_2024"] == 1.0 and results["identity"]["mean"]["score_2024"] < 1
    assert results["truth"]["mean"]["wall_time_s"] == 0.5
    row = results["dense"]["scans"]["000/LH_rotation"]
    assert set(row) >= {"GPE", "GLE", "LPE", "LLE", "score"}
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert len(rows) == 4 + 3 + 4 + 4 and rows[0]["method"] == "truth"


def test_dense_and_transform_predictions_score_alike(train_dir, tmp_path):
    from speckle_rec.evaluate import evaluate

    ds = open_dataset(train_dir)
    a = write_method(train_dir, tmp_path / "a" / "same", noise=0.02, seed=3)
    b = write_method(train_dir, tmp_path / "b" / "samedense", noise=0.02, seed=3, ddf=True)
    results = evaluate(ds, [a, b], progress=False)["methods"]
    for metric in ("GPE", "GLE", "LPE", "LLE"):
        assert results["same"]["mean"][metric] == pytest.approx(results["samedense"]["mean"][metric], rel=1e-4)


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], capture_output=True, text=True)


def test_bad_input_is_one_line_and_exit_1(train_dir, tmp_path):
    pred = write_method(train_dir, tmp_path / "pred")
    # a prediction whose frame count differs from the scan's
    path = prediction_path(pred, "000", "LH_rotation")
    write_prediction(path, global_transforms=np.tile(np.eye(4), (5, 1, 1)))
    result = _run_cli("evaluate", pred, "--data", train_dir, "--quiet")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "has 5 rows but the scan has 12 frames" in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
    debug = _run_cli("evaluate", pred, "--data", train_dir, "--quiet", "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_usage_errors_exit_2(tmp_path):
    assert _run_cli("evaluate").returncode == 2
    assert _run_cli("nonsense").returncode == 2
    result = _run_cli("evaluate", tmp_path / "none", "--data", tmp_path)
    assert result.returncode == 1 and "no scans found" in result.stderr


def test_json_written_atomically_only_on_success(train_dir, tmp_path):
    out = tmp_path / "r.json"
    assert main(["evaluate", str(tmp_path / "missing"), "--data", str(train_dir), "--json", str(out)]) == 1
    assert not out.exists()
