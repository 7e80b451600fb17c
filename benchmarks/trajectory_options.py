"""Trajectory settings side by side on tracked folders: drift, travel scale, sign accuracy, score.

Usage:
    python benchmarks/trajectory_options.py DATA_DIR [DATA_DIR ...] --model CALIB.json
        [--variant NAME:KEY=VALUE,... ...] [--start estimate|oracle-signs|truth] [--threads 2] [--json FILE]

    # e.g. on the folders benchmarks/accuracy.py --out acc keeps:
    python benchmarks/trajectory_options.py acc/data/*_240x320_1000 \\
        --model acc/calibration/240x320_1000_seed2.json \\
        --variant "A:f_scale=10,acceleration_mm=3" --variant "B:f_scale=100,acceleration_mm=10"

For tuning the trajectory (:mod:`speckle_rec.trajectory`), not for reporting a method: each scan
is measured once (flow and patch correlations), then stages 2-5 run for the default settings
("default", always first) and for each ``--variant``. A variant sets any of ``DEFAULT_OPTIONS``
(values are Python literals) and, with ``model=FILE``, its own decorrelation curves;
``max_iterations=0`` shows the chained key steps before the bundle adjustment.

Per scan and variant, with the mirror set to the truth's (an oracle: it isolates everything else):
- ``drift_percent``: final-frame error of the image centre as a percentage of its true travel
  (as in ``benchmarks/accuracy.py``; sweeps only, None below 20 mm of travel);
- ``scale``: the centre's estimated net out-of-plane travel over the true one (1 is unbiased;
  None below 20 mm of true net travel, e.g. on rotation scans, which go back and forth);
- ``sign_accuracy``: moving frames whose out-of-plane step has the true sign (``accuracy.py``'s rule);
- ``score``: the 2025 final score against the identity;
- ``final_rotation_error_deg`` (JSON only): the last frame's orientation error, a rotation vector
  in its image axes (x, y, z), degrees.

``--start`` chooses what the bundle adjustment starts from:
- ``estimate`` (default): the method as it runs;
- ``oracle-signs``: the key steps with the signs the truth gives them (each key step's fitted
  |plane| turned to agree with the true step at the anchors), then as the method: what the sign
  stage costs;
- ``truth``: the true poses (no pivot prior, no sign stage): whatever the adjustment then moves
  away from the truth is its own bias.
Prints one table (mean per folder and variant); ``--json FILE`` writes every per-scan number.
"""

import argparse
import ast
import sys
import time
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from accuracy import SWEEP_MM, ScanGeometry, sign_and_drift
from cli.output import format_table, write_json
from speckle_rec import trajectory
from speckle_rec.decorrelation import DecorrelationModel
from speckle_rec.direction import first_direction, mirror
from speckle_rec.errors import DataError
from speckle_rec.evaluate import ScanTruth
from speckle_rec.inplane import fan_mask_from_frames
from speckle_rec.metrics import scores_2025
from speckle_rec.transforms import locals_from_globals

from _machine import cell, machine_line, mean_known, scan_results, start_script

DEFAULT = "default"


def parse_variant(text, parser):
    """'NAME:KEY=VALUE,...' → (name, options, model path or None)."""
    name, _, settings = text.partition(":")
    if not name or name == DEFAULT:
        parser.error(f"expected --variant NAME:KEY=VALUE,... with a NAME other than '{DEFAULT}', got '{text}'")
    options, model = {}, None
    for item in filter(None, settings.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            parser.error(f"--variant {name}: expected KEY=VALUE, got '{item}'")
        if key == "model":
            model = value
            continue
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parser.error(f"--variant {name}: {key}={value} is not a Python literal")
    return name, options, model


def motion_numbers(truth, geometry, frame_to_first, identity_errors):
    """Drift, travel scale, sign accuracy and score of one estimate (already mirrored like the truth)."""
    frame_to_previous = locals_from_globals(frame_to_first)
    true_z = geometry.elevation(truth.frame_to_previous)
    est_z = geometry.elevation(frame_to_previous)
    numbers = sign_and_drift((true_z, geometry.centre_end(truth.frame_to_first)),
                             (est_z, geometry.centre_end(frame_to_first)))
    centre = geometry.anchor_k.size // 2  # the middle anchor: centre column, centre row of the fan
    true_travel = true_z[:, centre].sum()  # back and forth (rotation scans) nets out: no scale then
    numbers["scale"] = float(est_z[:, centre].sum() / true_travel) if abs(true_travel) >= SWEEP_MM else None
    # the last frame's orientation error as a rotation vector in its image axes (x, y, z), degrees
    wrong = truth.frame_to_first[-1, :3, :3].T @ frame_to_first[-1, :3, :3]
    numbers["final_rotation_error_deg"] = np.degrees(Rotation.from_matrix(wrong).as_rotvec()).round(2).tolist()
    errors = truth.errors_of_transforms(frame_to_first, frame_to_previous)
    numbers["score"] = float(scores_2025(errors, identity_errors)["score"])
    return numbers


def measure_scan(scan, calibration, model, threads, **options):
    """Stage 1 of :func:`speckle_rec.trajectory.estimate_trajectory` on a scan (``options``: its settings)."""
    frames = scan.read_frames()
    return trajectory._measure(frames, fan_mask_from_frames(frames), calibration.spacing_mm, model,
                               trajectory._check_options(options), threads, False)


def true_poses(truth):
    """(N, 4, 4) true frame → frame 0 poses, frame 0's (the identity) included."""
    return np.concatenate([np.eye(4)[None], truth.frame_to_first])


def pair_planes(poses, i, j):
    """(M, 3) plane (tz, a, b) of frame ``j[m]`` in frame ``i[m]``'s coordinates, from ``poses``
    (N, 4, 4) of the frames in a common frame."""
    return trajectory._planes_of(np.linalg.solve(poses[i], poses[j]))


def true_pair_planes(truth, i, j):
    """(M, 3) true plane (tz, a, b) of frame ``j[m]`` in frame ``i[m]``'s coordinates."""
    return pair_planes(true_poses(truth), i, j)


def true_step_planes(truth, keys):
    """(K − 1, 3) true plane (tz, a, b) of each key step ``keys[m] → keys[m + 1]``."""
    return true_pair_planes(truth, keys[:-1], keys[1:])


def true_key_signs(meas, truth):
    """``sign_oracle`` for :func:`speckle_rec.trajectory._estimate`: the sign of each key step's
    |plane| that agrees with the true step at the anchors."""
    anchors = trajectory._anchor_design(meas)

    def oracle(keys, planes):
        true_steps = true_step_planes(truth, keys)
        agreement = np.sum((true_steps @ anchors.T) * (planes @ anchors.T), axis=1)
        return np.where(agreement < 0, -1.0, 1.0)

    return oracle


def run_scan(scan, calibration, variants, *, start_from, threads):
    truth = ScanTruth.load(scan, calibration)
    geometry = ScanGeometry(scan, truth.grid)
    eye = np.tile(np.eye(4), (truth.n_frames - 1, 1, 1))
    identity_errors = truth.errors_of_transforms(eye, eye)
    first_model = variants[0][2]
    meas = measure_scan(scan, calibration, first_model, threads)
    points = np.stack([meas.grid.x_mm, meas.grid.y_mm], axis=1)
    true_direction = first_direction(truth.frame_to_first, points)
    out = {}
    for name, options, model in variants:
        if (model.patch_mm, model.smooth_px) != (first_model.patch_mm, first_model.smooth_px):
            raise SystemExit(f"variant {name}: its model measures with other patches or smoothing than the first")
        meas.model = model
        opts = trajectory._check_options(dict(options, first_direction=None))
        start = time.perf_counter()
        if start_from == "truth":
            frame_to_first = trajectory._bundle_adjust(meas, true_poses(truth), opts, False, False)[0][1:]
        else:
            oracle = true_key_signs(meas, truth) if start_from == "oracle-signs" else None
            frame_to_first = trajectory._estimate(meas, opts, False, {}, threads=threads,
                                                  sign_oracle=oracle).frame_to_first
        if first_direction(frame_to_first, points) != true_direction:
            frame_to_first = mirror(frame_to_first)
        out[name] = dict(motion_numbers(truth, geometry, frame_to_first, identity_errors),
                         seconds=time.perf_counter() - start)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", nargs="+", help="tracked data folders with landmarks (e.g. acc/data/<run>)")
    parser.add_argument("--model", required=True, help="calibration or model JSON for the default settings")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="settings to compare (repeatable); model=FILE sets its curves")
    parser.add_argument("--start", choices=("estimate", "oracle-signs", "truth"), default="estimate",
                        help="what the bundle adjustment starts from (default: the method's estimate)")
    parser.add_argument("--threads", type=int, default=2, help="Numba / OpenCV threads (default 2)")
    parser.add_argument("--json", metavar="FILE", help="write every per-scan number as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    log, threads, machine, started = start_script(args.quiet, args.threads)
    parsed = [parse_variant(v, parser) for v in args.variant]
    names = [DEFAULT] + [name for name, _, _ in parsed]
    if len(set(names)) != len(names):
        parser.error("variant names must be unique")
    for name, options, _ in parsed:  # unknown or bad options fail before any work
        try:
            trajectory._check_options(options)
        except DataError as error:
            parser.error(f"--variant {name}: {error}")
    variants = [(DEFAULT, {}, DecorrelationModel.from_json(args.model))]
    variants += [(name, options, DecorrelationModel.from_json(path or args.model)) for name, options, path in parsed]
    results, rows = {}, []

    def measure(scan, calibration):
        return run_scan(scan, calibration, variants, start_from=args.start, threads=threads)

    def summary(numbers):
        return ", ".join(f"{name} drift {cell(v['drift_percent'], 1)} scale {cell(v['scale'], 3)} "
                         f"score {v['score']:.3f}" for name, v in numbers.items())

    for folder, per_scan in scan_results(args.data, measure, summary, log):
        results[str(folder)] = per_scan
        for name in names:
            values = [entry[name] for entry in per_scan.values()]
            rows.append({"data": Path(folder).name, "variant": name, "scans": len(values),
                         **{k: mean_known([v[k] for v in values])
                            for k in ("score", "drift_percent", "scale", "sign_accuracy", "seconds")}})
    columns = [("data", "data", None), ("variant", "variant", None), ("scans", "scans", None),
               ("score", "score", 3), ("drift_percent", "drift %", 2), ("scale", "scale", 3),
               ("sign_accuracy", "sign", 3), ("seconds", "s/scan", 1)]
    print(machine_line(machine, threads))
    table = [[cell(row[key], digits) if digits else row[key] for key, _, digits in columns] for row in rows]
    print(format_table([title for _, title, _ in columns], table))
    print(f"bundle adjustment started from: {args.start}; {time.perf_counter() - started:.0f} s in all")
    if args.json:
        write_json(args.json, {"command": " ".join(sys.argv), "machine": machine, "start": args.start,
                               "variants": {name: {"options": options, "model": path or args.model}
                                            for name, options, path in [(DEFAULT, {}, None)] + parsed},
                               "rows": rows, "scans": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
