"""How well the decorrelation curves predict measured ρ at the true geometry, by elevation and tilt.

Usage:
    python benchmarks/tilt_tail.py DATA_DIR [DATA_DIR ...] --model CALIB.json [--threads 2] [--json FILE]

    # e.g. on the folders benchmarks/accuracy.py --out acc keeps:
    python benchmarks/tilt_tail.py acc/data/rotation_240x320_1000 \\
        --model acc/calibration/240x320_1000_seed2.json

Why: the model's tilt factor ``exp(−½ α²/σ_α²)`` (:mod:`speckle_rec.decorrelation`) is fitted on
calibration samples whose tilts are mostly small (81 % below 1° in ``accuracy.py``'s 240×320
calibration, 6 % above 2.5°). A fan about the skin tilts 1-1.5° per frame, so
the sign stage's two- and three-step spans (:func:`speckle_rec.trajectory._triplet_terms`) judge
tilts of 2-4°. This script shows where the curves hold.

Per scan the frames are measured once as :func:`speckle_rec.trajectory.estimate_trajectory`
measures them (every start frame at strides 1, 2, 4, … 32). Each pair's true plane comes from the
tracker. At every patch it takes |z| (mm), the tilt about the patch's beam-lateral axis |α| (the
model's tilt argument) and the measured ρ. For each (|z|, |α|) bin with at least ``MIN_SAMPLES``
patches over a folder's scans it prints:
- ``measured``: the mean measured ρ;
- ``model``: the mean of the model's ρ at the true |z|, in-plane rotation and tilt;
- ``no tilt``: the same without the tilt factor.
``--json FILE`` writes every bin's sums per folder.
"""

import sys
import time
from pathlib import Path

import numpy as np

from cli.output import format_table, write_json
from speckle_rec import trajectory
from speckle_rec.decorrelation import DecorrelationModel
from speckle_rec.evaluate import ScanTruth

from _machine import folder_parser, machine_line, scan_results, start_script
from trajectory_options import measure_scan, true_pair_planes

Z_EDGES_MM = (0.0, 0.3, 0.7, 1.2)
TILT_EDGES_DEG = (0.0, 0.25, 0.5, 1.0, 1.5, 2.5, 4.0)
MIN_SAMPLES = 200
SUMS = ("samples", "measured", "model", "no_tilt")


def binned_sums(z_mm, tilt_deg, columns):
    """Per (|z|, |α|) bin: the patch count and the sums of each column.

    Parameters
    ----------
    z_mm, tilt_deg : (n,) ndarray
        |elevation| (mm) and |tilt| (degrees) of each finite sample.
    columns : dict of str to (n,) ndarray
        Values to sum per bin (measured ρ, model ρ, …).

    Returns
    -------
    (len(Z_EDGES_MM) − 1, len(TILT_EDGES_DEG) − 1) ndarray per key: ``samples`` and each column's
    name. Samples outside the edges are left out.
    """
    zi = np.searchsorted(Z_EDGES_MM, z_mm, side="right") - 1
    ti = np.searchsorted(TILT_EDGES_DEG, tilt_deg, side="right") - 1
    shape = (len(Z_EDGES_MM) - 1, len(TILT_EDGES_DEG) - 1)
    inside = (zi >= 0) & (zi < shape[0]) & (ti >= 0) & (ti < shape[1])
    flat = np.ravel_multi_index((zi[inside], ti[inside]), shape)
    size = shape[0] * shape[1]
    out = {"samples": np.bincount(flat, minlength=size).reshape(shape).astype(np.float64)}
    for name, values in columns.items():
        out[name] = np.bincount(flat, weights=values[inside], minlength=size).reshape(shape)
    return out


def run_scan(scan, calibration, model, threads):
    truth = ScanTruth.load(scan, calibration)
    meas = measure_scan(scan, calibration, model, threads)
    pi, pj = meas.pairs[:, 0], meas.pairs[:, 1]
    planes = true_pair_planes(truth, pi, pj)
    theta = meas.inplane_between(pi, pj)[:, 2][:, None]
    x, y = meas.grid.x_mm, meas.grid.y_mm
    z = np.abs(planes @ np.stack([np.ones_like(x), x, y]))
    tilt = np.abs(trajectory._tilt_per_patch(planes, theta[:, 0], meas))
    rho = meas.rho.astype(np.float64)
    keep = np.isfinite(rho)
    columns = {"measured": rho[keep], "model": model.rho(z, y, theta, tilt)[keep],
               "no_tilt": model.rho(z, y, theta)[keep]}
    sums = binned_sums(z[keep], np.degrees(tilt[keep]), columns)
    return {"pairs": int(pi.size), **{name: values.tolist() for name, values in sums.items()}}


def main(argv=None):
    parser = folder_parser(__doc__, json_help="write every folder's bin sums as JSON")
    args = parser.parse_args(argv)
    model = DecorrelationModel.from_json(args.model)
    log, threads, machine, started = start_script(args.quiet, args.threads)

    def measure(scan, calibration):
        return run_scan(scan, calibration, model, threads)

    def summary(numbers):
        return f"{numbers['pairs']} pairs"

    results, rows = {}, []
    for folder, per_scan in scan_results(args.data, measure, summary, log):
        total = {name: sum(np.asarray(s[name]) for s in per_scan.values()) for name in SUMS}
        results[str(folder)] = {name: values.tolist() for name, values in total.items()}
        for (zb, tb), count in np.ndenumerate(total["samples"]):
            if count < MIN_SAMPLES:
                continue
            rows.append([Path(folder).name, f"{Z_EDGES_MM[zb]:g}-{Z_EDGES_MM[zb + 1]:g}",
                         f"{TILT_EDGES_DEG[tb]:g}-{TILT_EDGES_DEG[tb + 1]:g}", int(count),
                         *(f"{total[name][zb, tb] / count:.3f}" for name in SUMS[1:])])
    print(machine_line(machine, threads))
    print(format_table(["data", "|z| mm", "|tilt| deg", "patches", "measured", "model", "no tilt"], rows))
    print(f"model {args.model}; true geometry from the tracker; {time.perf_counter() - started:.0f} s in all")
    if args.json:
        write_json(args.json, {"command": " ".join(sys.argv), "machine": machine, "model": args.model,
                               "z_edges_mm": Z_EDGES_MM, "tilt_edges_deg": TILT_EDGES_DEG,
                               "folders": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
