"""Smoke tests of the benchmark scripts: each main() on tiny sizes writes the JSON it promises.

Not a measurement (the sizes are far too small to mean anything); it catches a script broken by a
change of the library's API.
"""

import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_script(name):
    """Import ``benchmarks/<name>.py``; the scripts import each other as plain modules at import time."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def run_for_json(script, tmp_path, *args):
    """``script.main([*args, "--json", FILE, "--quiet"])`` must succeed; returns the JSON it wrote."""
    out = tmp_path / f"{script.__name__}.json"
    assert script.main([*args, "--json", str(out), "--quiet"]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def scripts():
    # speed.py imports the bench_* scripts inside its stages, also in fresh processes: the path stays
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import accuracy
        import speed

        yield accuracy, speed
    finally:
        sys.path.remove(str(BENCHMARKS))


# one linear scan of 60 frames at 120x160, calibrated on 100-frame scans (their folder: 120x160_100_seed2)
TINY_ACCURACY = ["--protocols", "linear", "--seeds", "1", "--frames", "60", "--height", "120",
                 "--width", "160", "--calibration-frames", "100", "--full-frames", "0", "--quiet"]


def finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_accuracy_with_an_extra_prediction_folder(scripts, tmp_path, capsys):
    accuracy, _ = scripts
    from speckle_rec.ddf import PixelGrid, ddfs_from_transforms
    from speckle_rec.io import open_dataset
    from speckle_rec.prediction import prediction_path, write_prediction
    from speckle_rec.transforms import globals_from_locals, matrices_from_params

    out, first = tmp_path / "out", tmp_path / "first.json"
    size = TINY_ACCURACY + ["--out", str(out)]
    assert accuracy.main(size + ["--json", str(first)]) == 0
    run = json.loads(first.read_text())["runs"][0]["name"]
    assert run == "linear_120x160_60"

    # a method that only writes the challenge's DDFs (as `speckle-rec predict` does), in the per-run layout
    data = open_dataset(out / "data" / run)
    scan = data.scans[0]
    n, h, w = scan.shape()
    local = np.tile(matrices_from_params([0.0, 0.0, 0.0, 0.0, 0.0, 0.5]), (n - 1, 1, 1))  # 0.5 mm out of plane
    grid = PixelGrid.from_calibration(data.calibration(), h, w)
    gp, gl, lp, ll = ddfs_from_transforms(globals_from_locals(local), local, scan.read_landmarks(), grid)
    write_prediction(prediction_path(tmp_path / "learned" / run, scan.subject, scan.name), GP=gp, GL=gl, LP=lp, LL=ll,
                     wall_time_s=1.0)

    second = tmp_path / "second.json"
    assert accuracy.main(size + ["--pred", f"learned={tmp_path / 'learned'}", "--json", str(second)]) == 0
    table = capsys.readouterr().out
    report = json.loads(second.read_text())
    assert {"machine", "runs", "table", "load_average_end"} <= set(report)
    rows = {row["method"]: row for row in report["table"]}
    assert list(rows) == ["identity", "constant_velocity", "in_plane_only", "speckle_rec", "speckle_rec_true_mirror",
                          "truth_mirrored", "learned"]
    for row in rows.values():
        assert row["scans"] == 1 and row["missing"] == 0
        assert all(finite(row[m]) for m in ("GPE", "GLE", "LPE", "LLE", "score"))
    assert rows["identity"]["score"] == 0.0
    for name in ("speckle_rec", "speckle_rec_true_mirror", "learned"):
        assert 0.0 <= rows[name]["sign_accuracy"] <= 1.0 and finite(rows[name]["drift_percent"])
    assert finite(rows["speckle_rec"]["seconds_per_scan"]) and finite(rows["speckle_rec"]["frames_per_s"])
    assert rows["learned"]["seconds_per_scan"] == pytest.approx(1.0)
    # the truth through the wrong mirror: every moving frame's out-of-plane step has the wrong sign
    assert rows["truth_mirrored"]["sign_accuracy"] == 0.0 and rows["truth_mirrored"]["score"] < 1.0
    assert "learned" in table and "speckle_rec_true_mirror" in table


def test_accuracy_replaces_only_its_own_folders(scripts, tmp_path):
    accuracy, _ = scripts
    ours = tmp_path / "ours"
    accuracy.fresh_folder(ours)
    (ours / "stale.h5").write_bytes(b"old run")
    accuracy.fresh_folder(ours)
    assert sorted(p.name for p in ours.iterdir()) == [accuracy.WRITTEN_BY]

    legacy = tmp_path / "legacy"  # prediction folders written before the marker existed
    (legacy / accuracy.OURS).mkdir(parents=True)
    accuracy.fresh_folder(legacy, known=accuracy.BUILT_IN)
    assert sorted(p.name for p in legacy.iterdir()) == [accuracy.WRITTEN_BY]

    foreign = tmp_path / "out" / "calibration" / "120x160_100_seed2"  # what --out below would simulate into
    foreign.mkdir(parents=True)
    (foreign / "mine.h5").write_bytes(b"someone's scan")
    with pytest.raises(SystemExit, match="not written by this script"):
        accuracy.main(TINY_ACCURACY + ["--out", str(tmp_path / "out")])
    assert (foreign / "mine.h5").read_bytes() == b"someone's scan"
    with pytest.raises(SystemExit, match="not written by this script"):
        accuracy.fresh_folder(foreign, known=accuracy.BUILT_IN)


def test_speed_runs_every_stage(scripts, tmp_path, capsys):
    _, speed = scripts
    path = tmp_path / "speed.json"
    assert speed.main(["--quick", "--in-process", "--frames", "40", "--json", str(path), "--quiet"]) == 0
    report = json.loads(path.read_text())
    assert {"machine", "rows", "errors", "load_average_end", "sizes"} <= set(report)
    assert report["errors"] == {}
    assert {row["stage"] for row in report["rows"]} == set(speed.STAGES)
    for row in report["rows"]:
        assert row["items"] >= 1 and finite(row["seconds"]) and row["seconds"] >= 0
        assert finite(row["wall_ms_per"]) and finite(row["peak_rss_mib"]) and row["peak_rss_mib"] > 0
    assert finite(next(r for r in report["rows"] if r["stage"] == "ddf")["speedup"])
    assert "predict_ddfs" in capsys.readouterr().out


def test_speed_stage_in_a_fresh_process(scripts):
    _, speed = scripts
    params = dict(speed.QUICK, threads=1, ddf_frames=4, ddf_height=64, ddf_width=80, data=None, prediction=None)
    rows, error = speed.run_in_child("ddf", params)
    assert error is None
    (row,) = rows
    assert row["stage"] == "ddf" and row["items"] == 4 and finite(row["seconds"]) and row["peak_rss_mib"] > 0


def default_curves(folder):
    """The packaged decorrelation curves written to ``folder / 'model.json'`` (a ``--model`` file)."""
    from speckle_rec.decorrelation import DecorrelationModel

    model = folder / "model.json"
    DecorrelationModel.default().to_json(model)
    return model


def tiny_sweep(folder):
    """A 60-frame 120x160 tracked linear sweep in ``folder / 'linear'`` and :func:`default_curves`."""
    from speckle_rec.simulate.dataset import simulate_dataset
    from speckle_rec.simulate.probe import Probe

    data = folder / "linear"
    simulate_dataset(data, protocol="linear", n_frames=60, probe=Probe.fit_image(120, 160), seed=3,
                     hands=("LH",), planes=("Per",), directions=("DtP",))
    return data, default_curves(folder)


def test_trajectory_options_compares_variants(tmp_path, capsys):
    trajectory_options = benchmark_script("trajectory_options")
    data, model = tiny_sweep(tmp_path)
    args = [str(data), "--model", str(model)]
    report = run_for_json(trajectory_options, tmp_path, *args, "--variant", "short:window=20,overlap=5")
    assert [row["variant"] for row in report["rows"]] == ["default", "short"]
    (scan,) = report["scans"][str(data)].values()
    for numbers in scan.values():
        assert math.isfinite(numbers["score"]) and 0.0 <= numbers["sign_accuracy"] <= 1.0
        assert numbers["scale"] is None or math.isfinite(numbers["scale"])
        assert len(numbers["final_rotation_error_deg"]) == 3
    for start in ("truth", "oracle-signs"):
        assert trajectory_options.main(args + ["--start", start, "--quiet"]) == 0
        assert f"started from: {start}" in capsys.readouterr().out
    capsys.readouterr()
    for bad, message in (("default:window=20", "other than 'default'"), ("x:window", "expected KEY=VALUE"),
                         ("x:window=twenty", "not a Python literal"), ("x:windw=20", "unknown option 'windw'")):
        with pytest.raises(SystemExit):
            trajectory_options.main(args + ["--variant", bad])
        assert message in capsys.readouterr().err


def test_tilt_bias_runs_on_a_tiny_sweep(tmp_path, capsys):
    tilt_bias = benchmark_script("tilt_bias")
    data, model = tiny_sweep(tmp_path)
    args = [str(data), "--model", str(model)]
    report = run_for_json(tilt_bias, tmp_path, *args, "--gradient", "-10", "--gradient", "0",
                          "--gradient", "10")
    assert "tilt err deg" in capsys.readouterr().out
    (scan,) = report["scans"][str(data)].values()
    assert scan["frames"] == 60 and scan["key_steps"] >= 2
    assert list(scan["gradients"]) == ["-10", "0", "10"]
    # a tiny scan with uncalibrated curves is too noisy for the sensitivity itself (single-frame key
    # steps, ~10 deg random walk); the table in benchmarks/README.md measures it on 1000-frame sweeps
    for numbers in scan["gradients"].values():
        assert math.isfinite(numbers["tilt_error_deg"]) and numbers["random_deg"] >= 0.0
        assert 0.1 < numbers["length_ratio"] < 10.0
    with pytest.raises(SystemExit):
        tilt_bias.main(args + ["--gradient", "60"])
    assert "strictly between -50 and 50" in capsys.readouterr().err


def test_tilt_tail_bins_by_elevation_and_tilt():
    tilt_tail = benchmark_script("tilt_tail")
    z = np.array([0.1, 0.2, 0.5, 0.5, 1.0, 5.0, 0.1])
    tilt = np.array([0.1, 0.1, 0.3, 3.0, 2.0, 0.1, 9.0])  # the last two fall outside the edges
    sums = tilt_tail.binned_sums(z, tilt, {"measured": np.arange(7.0)})
    expected = np.zeros((3, 6))
    expected[0, 0], expected[1, 1], expected[1, 5], expected[2, 4] = 2, 1, 1, 1
    assert np.array_equal(sums["samples"], expected)
    measured = sums["measured"]
    assert measured[0, 0] == 0.0 + 1.0 and measured[1, 5] == 3.0 and measured[2, 4] == 4.0
    assert measured.sum() == 0.0 + 1.0 + 2.0 + 3.0 + 4.0


def test_tilt_tail_runs_on_a_tiny_sweep(tmp_path, capsys):
    tilt_tail = benchmark_script("tilt_tail")
    data, model = tiny_sweep(tmp_path)
    report = run_for_json(tilt_tail, tmp_path, str(data), "--model", str(model))
    assert "no tilt" in capsys.readouterr().out
    folder = report["folders"][str(data)]
    samples = np.array(folder["samples"])
    assert samples.shape == (3, 6) and samples.sum() > 200
    # at the true geometry the (uncalibrated) curves' mean ρ lies near the measured mean overall;
    # a wrong elevation (sign, units, frame) would put it far off
    measured, model_rho = np.array(folder["measured"]), np.array(folder["model"])
    assert abs(measured.sum() - model_rho.sum()) / samples.sum() < 0.1
    assert np.all(np.array(folder["no_tilt"]) >= model_rho - 1e-9)  # the tilt factor only lowers ρ


def test_revisit_descriptor_compensates_the_in_plane_chain():
    import cv2

    revisits = benchmark_script("revisits")
    rng = np.random.default_rng(5)
    spacing = (0.3, 0.3)
    base = cv2.GaussianBlur(rng.uniform(0, 255, (200, 240)).astype(np.float32), (0, 0), 1.0)
    shift_px = 6
    # frame 1 sees frame 0's content 6 px (1.8 mm) further right; frame 2 is unrelated texture
    stack = np.stack([base, np.roll(base, shift_px, axis=1),
                      cv2.GaussianBlur(rng.uniform(0, 255, (200, 240)).astype(np.float32), (0, 0), 1.0)])
    mask = np.zeros((200, 240), bool)
    mask[10:190, 20:220] = True
    chain = np.tile(np.eye(3), (3, 1, 1))
    chain[1, 0, 2] = -shift_px * spacing[0]  # frame-1 mm → frame-0 mm
    corr = revisits.descriptor_correlation(stack, mask, chain, spacing, np.arange(3))
    assert np.allclose(np.diag(corr), 1.0)
    assert corr[0, 1] > 0.95 and abs(corr[0, 2]) < 0.2
    uncompensated = revisits.descriptor_correlation(stack, mask, np.tile(np.eye(3), (3, 1, 1)), spacing,
                                                    np.arange(3))
    assert uncompensated[0, 1] < 0.5


def tiny_rotation(folder):
    """A 60-frame 120x160 tracked rotation-protocol scan in ``folder / 'rotation'`` and
    :func:`default_curves`."""
    from speckle_rec.simulate.dataset import simulate_dataset
    from speckle_rec.simulate.probe import Probe

    data = folder / "rotation"
    simulate_dataset(data, protocol="rotation", n_frames=60, probe=Probe.fit_image(120, 160), seed=2,
                     hands=("LH",))
    return data, default_curves(folder)


def test_revisits_runs_on_a_tiny_rotation_scan(tmp_path, capsys):
    revisits = benchmark_script("revisits")
    data, _ = tiny_rotation(tmp_path)
    report = run_for_json(revisits, tmp_path, str(data), "--min-gap", "10")
    assert "recall <1 mm" in capsys.readouterr().out
    (scan,) = report["scans"][str(data)].values()
    assert 0.0 <= scan["revisit_fraction"] <= 1.0 and scan["frames"] == 60
    for numbers in scan["thresholds"].values():
        assert numbers["flagged"] >= 0
        for key in ("within_2mm", "within_5mm", "recall_1mm"):
            assert numbers[key] is None or 0.0 <= numbers[key] <= 1.0
    for bad, message in ((["--every", "0"], "must be >= 1"), (["--threshold", "2"], "must lie in")):
        with pytest.raises(SystemExit):
            revisits.main([str(data)] + bad)
        assert message in capsys.readouterr().err


def test_crossing_lines_runs_on_a_tiny_rotation_scan(tmp_path, capsys):
    crossing_lines = benchmark_script("crossing_lines")
    data, model = tiny_rotation(tmp_path)
    report = run_for_json(crossing_lines, tmp_path, str(data), "--model", str(model), "--pairs", "10",
                          "--every", "1")
    out = capsys.readouterr().out
    assert "share < 0" in out and "gain orders" in out
    (scan,) = report["folders"][str(data)].values()
    assert 0 <= scan["wrong"] <= scan["junctions"] and len(scan["tested"]) >= scan["wrong"]
    assert all(isinstance(test["wrong_before"], bool) for test in scan["step3"])
    gains = np.array([row["gain_true"] for row in scan["tested"]])
    gains = gains[np.isfinite(gains)]
    # on the true poses the crossing frames share their speckle line; a flip moves it away
    assert gains.size >= 5 and np.mean(gains) < -0.05
    with pytest.raises(SystemExit):
        crossing_lines.main([str(data), "--model", str(model), "--pairs", "0"])
    assert "must be at least 1" in capsys.readouterr().err


def test_crossing_lines_judge_step3_tests_by_the_relation_before_them():
    """Two runs of key steps (frames 0–40 and 60–100) moving out of plane; whether the final poses
    keep their true relation, and whether the test flipped, say whether it was wrong before."""
    crossing_lines = benchmark_script("crossing_lines")
    keys = np.arange(0, 101, 10)
    anchors = np.array([[1.0, 0.0, 10.0], [1.0, 10.0, 20.0], [1.0, -10.0, 30.0]])

    def poses(step_mm):  # (10,) key steps out of plane (mm) → (101, 4, 4); only key frames matter
        out = np.tile(np.eye(4), (101, 1, 1))
        out[keys, 2, 3] = np.concatenate([[0.0], np.cumsum(step_mm)])
        return out

    true = poses(np.r_[[1.0] * 4, [0.0] * 2, [-1.0] * 4])  # a fan out and back across a quiet stretch
    kept = poses(np.r_[[-1.0] * 4, [0.0] * 2, [1.0] * 4])  # both runs mirrored: relation right
    broken = poses(np.r_[[1.0] * 4, [0.0] * 2, [1.0] * 4])  # the second run mirrored: wrong
    test = {"before": [0, 40], "after": [61, 100], "gain": 0.1}
    cases = [(kept, False, False), (kept, True, True), (broken, False, True), (broken, True, False)]
    for estimated, flipped, wrong_before in cases:
        steps = [crossing_lines.step_elevations(poses, keys, anchors) for poses in (estimated, true)]
        (row,) = crossing_lines.step3_rows([dict(test, flipped=flipped)], *steps, keys)
        assert row["wrong_before"] is wrong_before and row["gain"] == 0.1
    tests = [{"gain": g, "wrong_before": w, "flipped": f}
             for g, w, f in ((0.2, True, True), (0.01, True, False), (0.03, False, True),
                             (-0.1, False, False), (None, False, False))]
    # wrong gains 0.2, 0.01 against right 0.03, −0.1: three of the four pairs in order
    assert crossing_lines.summarise_step3(tests) == ["5", "2", "1", "1", "0.750"]
    assert crossing_lines.summarise_step3([]) == ["0", "0", "0", "0", "-"]


def test_stops_runs_on_a_tiny_rotation_scan(tmp_path, capsys):
    stops = benchmark_script("stops")
    data, model = tiny_rotation(tmp_path)
    report = run_for_json(stops, tmp_path, str(data), "--model", str(model))
    out = capsys.readouterr().out
    assert "went on" in out and "broken" in out
    (scan,) = report["folders"][str(data)].values()
    assert 0 <= len(scan["tested"]) <= scan["stops"] and scan["seconds"] >= 0.0
    for row in scan["tested"]:
        first, last = row["steps"]
        assert 0 < first <= last and isinstance(row["true_turn"], bool) and abs(row["cosine"]) <= 1.0
        assert row["flipped"] <= row["turn"] and (not row["turn"] or row["gain"] > 0.25)


def test_stops_judge_each_stop_by_the_true_motion_on_its_two_sides():
    """A 1-D motion out of plane: out over key steps 0-3, a stop (step 4), back (turn) or on (pause)."""
    stops = benchmark_script("stops")
    keys = np.arange(0, 91, 10)
    anchors = np.array([[1.0, 0.0, 10.0], [1.0, 10.0, 20.0]])
    test = {"steps": [4, 4], "gain": 0.5, "cosine": 0.9, "turn": True, "flipped": True}
    for later, turn in ((-1.0, True), (1.0, False)):
        poses = np.tile(np.eye(4), (91, 1, 1))
        poses[keys, 2, 3] = np.concatenate([[0.0], np.cumsum(np.r_[[1.0] * 4, 0.1, [later] * 4])])
        (row,) = stops.true_turns([test], poses, keys, anchors)
        assert row["true_turn"] is turn and row["gain"] == 0.5
    rows = [dict(true_turn=True, gain=0.6, cosine=0.8, turn=True, flipped=True),
            dict(true_turn=True, gain=0.4, cosine=-0.9, turn=True, flipped=False),
            dict(true_turn=True, gain=0.05, cosine=0.7, turn=False, flipped=False),
            dict(true_turn=False, gain=0.1, cosine=0.9, turn=False, flipped=False),
            dict(true_turn=False, gain=0.3, cosine=0.95, turn=True, flipped=True)]
    # turns: 3, median gain 0.4, 2 called, 2 went on before, 1 mended; pauses: 2, max 0.3, 1 called, 1 broken
    assert stops.summarise(rows) == ["3", "0.400", "2", "2", "1", "2", "0.300", "1", "1"]
    assert stops.summarise([]) == ["0", "-", "0", "0", "0", "0", "-", "0", "0"]


def test_anatomy_slide_runs_on_a_tiny_rotation_scan(tmp_path, capsys):
    anatomy_slide = benchmark_script("anatomy_slide")
    data, model = tiny_rotation(tmp_path)
    report = run_for_json(anatomy_slide, tmp_path, str(data), "--model", str(model))
    assert "same-view pairs" in capsys.readouterr().out
    (scan,) = report["folders"][str(data)].values()
    assert 0 < scan["moving"] <= scan["key_steps"]
    for key in ("adjacent_accuracy", "same_view_accuracy", "dp_adjacent_accuracy"):
        assert scan[key] is None or 0.0 <= scan[key] <= 1.0
    assert scan["adjacent_pairs"] >= 1
    for stretch in scan["stretches"]:
        first, last = stretch["steps"]
        assert 0 < first <= last < scan["key_steps"] - 1 and stretch["pairs"] >= 0
    by_cosine = np.array(scan["same_view_by_cosine"])  # (bins, [pairs, right])
    assert by_cosine.shape == (len(anatomy_slide.COSINE_BINS) - 1, 2)
    assert np.all(by_cosine[:, 1] <= by_cosine[:, 0])
    # the kept same-view pairs (|cosine| > MIN_COSINE) are those of the bins from MIN_COSINE on
    kept = anatomy_slide.COSINE_BINS.index(anatomy_slide.MIN_COSINE)
    assert by_cosine[kept:, 0].sum() == scan["same_view_pairs"]

