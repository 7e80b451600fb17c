"""`speckle-rec demo`: the whole job on simulated data, no download needed.

Simulates a tracked calibration scan and a tracked test scan (TUS-REC2025 rotation protocol),
calibrates the decorrelation curves on the first, reconstructs the second from its images alone,
scores it against the identity and constant-velocity predictions, and writes a trajectory plot and
a 3D volume. Every intermediate is an ordinary file in OUT_DIR, so each step can be rerun by hand
with the commands printed at the end.
"""

import importlib.util
import time
from pathlib import Path

from .baselines import constant_velocity_transforms, mean_local_params
from .calibrate import calibrate_model, learn_direction_prior, save_calibration
from .evaluate import evaluate
from .io import open_dataset
from .prediction import prediction_path, write_prediction
from .reconstruct import reconstruct_dataset
from .simulate.dataset import simulate_dataset
from .simulate.probe import Probe
from .transforms import transforms_from_tforms

CALIBRATION_SUBJECT = "900"
TEST_SUBJECT = "050"


def _log(message, log):
    if log is not None:
        log(message)


def run_demo(out_dir, *, calibration_frames=400, test_frames=800, height=480, width=640, seed=0, progress=True,
             log=print):
    """Run the demo into ``out_dir``; returns the :func:`speckle_rec.evaluate.evaluate` results.

    Parameters
    ----------
    out_dir : str or Path
    calibration_frames, test_frames : int
        Frames of the tracked calibration scan and of the test scan.
    height, width : int
        Image size.
    seed : int
    progress : bool
        Progress bars on stderr.
    log : callable or None
        Receives one line per step.

    Returns
    -------
    dict
    """
    out = Path(out_dir)
    probe = Probe.fit_image(height, width)
    started = time.perf_counter()
    steps = []

    def step(name):
        steps.append((name, time.perf_counter()))
        _log(f"[{time.perf_counter() - started:6.1f} s] {name}", log)

    step(f"simulating a tracked calibration scan ({calibration_frames} frames, {height}x{width})")
    calib_dir = out / "calibration_data"
    simulate_dataset(calib_dir, protocol="rotation", subjects=(CALIBRATION_SUBJECT,), n_frames=calibration_frames,
                     probe=probe, seed=seed + 1, hands=("RH",))
    step(f"simulating a test scan ({test_frames} frames) in the challenge's test layout")
    test_dir = out / "test_data"
    simulate_dataset(test_dir, protocol="rotation", subjects=(TEST_SUBJECT,), n_frames=test_frames, layout="test",
                     probe=probe, seed=seed, hands=("LH",))

    step("calibrating the decorrelation curves on the tracked scan")
    calibration_data = open_dataset(calib_dir)
    model, report = calibrate_model(calibration_data, progress=progress)
    prior = learn_direction_prior(calibration_data)  # one scan: not decisive, the +1 convention stays
    save_calibration(out / "calibration.json", model, report=report, prior=prior)

    step("reconstructing the test scan from its images alone")
    test_data = open_dataset(test_dir)
    pred_root = out / "predictions"
    summary = reconstruct_dataset(test_data, pred_root / "speckle_rec", model=model, direction_prior=prior,
                                  progress=progress, overwrite=True)
    if summary.failed:
        key, error = next(iter(summary.failed.items()))
        raise RuntimeError(f"reconstruction of {key} failed: {error}")

    step("constant-velocity prediction (mean motion of the tracked calibration scan)")
    calibration = calibration_data.calibration()
    locals_ = [transforms_from_tforms(s.read_tforms(), calibration.image_to_tool)[1] for s in calibration_data.scans]
    params = mean_local_params(locals_)
    for scan in test_data.scans:
        frame_to_first, frame_to_previous = constant_velocity_transforms(scan.shape()[0], params)
        write_prediction(prediction_path(pred_root / "constant_velocity", scan.subject, scan.name),
                         global_transforms=frame_to_first, local_transforms=frame_to_previous)

    step("scoring against the ground truth")
    results = evaluate(test_data, [pred_root / "speckle_rec", pred_root / "constant_velocity"], progress=progress)

    step("plotting trajectories and compounding a 3D volume")
    if importlib.util.find_spec("matplotlib") is None:
        _log("matplotlib is not installed, so no plot: pip install 'speckle_rec[plot]'", log)
    else:
        from .plot import plot_predictions

        plot_predictions(test_data, pred_root / "speckle_rec", out / "plots", progress=False)
    from .volume import compound_volume, scan_poses, write_volume

    scan = test_data.scans[0]
    frame_to_first = scan_poses(scan, calibration, pred_dir=pred_root / "speckle_rec")
    with scan.frames() as frames:
        volume, origin, voxel = compound_volume(frames, frame_to_first, spacing_mm=calibration.spacing_mm,
                                                voxel_mm=0.5)
    write_volume(out / "volume.mha", volume, origin, voxel)
    step("done")
    results["demo"] = {"out": str(out), "seconds": time.perf_counter() - started,
                       "steps": {name: round(t - started, 2) for name, t in steps}}
    return results
