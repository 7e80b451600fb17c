"""How the decorrelation curves' depth profile tilts a sweep: key-step tilt error with the true signs.

Usage:
    python benchmarks/tilt_bias.py DATA_DIR [DATA_DIR ...] --model CALIB.json [--gradient PCT ...]
        [--threads 2] [--json FILE]

    # e.g. on the folders benchmarks/accuracy.py --out acc keeps:
    python benchmarks/tilt_bias.py acc/data/linear_240x320_1000 \\
        --model acc/calibration/240x320_1000_seed2.json

Why: for an elevational sweep, a distance bias that grows linearly with depth and a steady tilt
about image x give the same patch correlations at every stride (to first order the pair (i, i + s)
sees ``z(y) = s·v·(1 + g·(y − y₀))`` either way), so no frame pair can tell them apart and
only the calibration sets the sweep's accumulated tilt. This script measures that dependence
without the rest of the pipeline.

Per scan the frames are measured once as :func:`speckle_rec.trajectory.estimate_trajectory`
measures them. The key steps (stage 2) are fitted in ρ space (:func:`speckle_rec.trajectory.fit_planes`)
with the curves of ``--model`` whose σ is multiplied by ``1 + PCT/100 · (y − y_mid) / 20 mm``
(``y_mid`` the middle of the model's depth range), for each ``--gradient PCT`` (default −2, −1,
0, 1, 2). Each fitted |plane| takes the sign of the true key step (an oracle: the sign stage is
left out). Per scan and gradient:
- ``tilt_error_deg``: sum over the key steps of the error of the plane's slope along image y
  (the step's tilt about image x), degrees: the orientation error the chained key steps leave at
  the last frame;
- ``random_deg``: the standard deviation of the per-step errors times √(key steps): the part a
  random walk of independent errors would explain;
- ``length_ratio``: the key steps' summed |z| at the patch grid's centroid over the true sum.
Prints one table (mean, min and max over each folder's scans per gradient); ``--json FILE`` writes
every per-scan number.
"""

import sys
import time
from pathlib import Path

import numpy as np

from cli.output import format_table, write_json
from speckle_rec import trajectory
from speckle_rec.decorrelation import DecorrelationModel
from speckle_rec.evaluate import ScanTruth

from _machine import cell, folder_parser, machine_line, mean_known, scan_results, start_script
from trajectory_options import measure_scan, true_step_planes

GRADIENT_SPAN_MM = 20.0  # --gradient is a percentage per this much depth


def run_scan(scan, calibration, model, gradients, threads):
    truth = ScanTruth.load(scan, calibration)
    options = trajectory._check_options({})
    meas = measure_scan(scan, calibration, model, threads)
    keys, rho, theta = trajectory._key_steps(meas, options["key_rho"])
    true_planes = true_step_planes(truth, keys)
    centroid = np.array([1.0, meas.grid.x_mm.mean(), meas.grid.y_mm.mean()])
    true_z = true_planes @ centroid
    out = {"frames": int(meas.n_frames), "key_steps": int(keys.size - 1), "gradients": {}}
    for percent in gradients:
        meas.model = model.with_sigma_gradient(percent / 100.0 / GRADIENT_SPAN_MM)
        planes, _ = trajectory.fit_planes(rho, theta, meas, f_scale=options["f_scale"],
                                          rho_sigma_floor=options["rho_sigma_floor"])
        signed = planes * np.where(true_z < 0, -1.0, 1.0)[:, None]  # fitted planes have z >= 0 there
        error = np.degrees(signed[:, 2] - true_planes[:, 2])
        out["gradients"][f"{percent:g}"] = {
            "tilt_error_deg": float(error.sum()),
            "random_deg": float(error.std() * np.sqrt(error.size)),
            "length_ratio": float(np.abs(signed @ centroid).sum() / max(np.abs(true_z).sum(), 1e-12)),
        }
    return out


def main(argv=None):
    parser = folder_parser(__doc__)
    parser.add_argument("--gradient", type=float, action="append", metavar="PCT",
                        help=f"σ gradient in %% per {GRADIENT_SPAN_MM:g} mm of depth "
                             "(repeatable; default -2 -1 0 1 2)")
    args = parser.parse_args(argv)
    gradients = args.gradient or [-2.0, -1.0, 0.0, 1.0, 2.0]
    if not all(abs(g) < 50.0 for g in gradients):
        parser.error("--gradient must lie strictly between -50 and 50 (% per 20 mm)")
    model = DecorrelationModel.from_json(args.model)
    log, threads, machine, started = start_script(args.quiet, args.threads)

    def measure(scan, calibration):
        return run_scan(scan, calibration, model, gradients, threads)

    def summary(numbers):
        return f"{numbers['key_steps']} key steps, tilt error " + ", ".join(
            f"{g} %: {v['tilt_error_deg']:+.2f} deg" for g, v in numbers["gradients"].items())

    results, rows = {}, []
    for folder, per_scan in scan_results(args.data, measure, summary, log):
        results[str(folder)] = per_scan
        for percent in gradients:
            values = [s["gradients"][f"{percent:g}"] for s in per_scan.values()]
            tilt = [v["tilt_error_deg"] for v in values]
            rows.append([Path(folder).name, f"{percent:+g}", len(values), cell(mean_known(tilt), 2),
                         cell(min(tilt, default=None), 2), cell(max(tilt, default=None), 2),
                         cell(mean_known([v["random_deg"] for v in values]), 2),
                         cell(mean_known([v["length_ratio"] for v in values]), 3)])
    print(machine_line(machine, threads))
    print(format_table(["data", f"sigma %/{GRADIENT_SPAN_MM:g} mm", "scans", "tilt err deg", "min", "max",
                        "random deg", "length"], rows))
    print(f"model {args.model}; key steps with the true signs; {time.perf_counter() - started:.0f} s in all")
    if args.json:
        write_json(args.json, {"command": " ".join(sys.argv), "machine": machine, "model": args.model,
                               "gradients": gradients, "scans": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
