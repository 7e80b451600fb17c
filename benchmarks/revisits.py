"""Do scans come back to earlier poses, and can the frames tell? Numbers for a loop-closure stage.

Usage:
    python benchmarks/revisits.py DATA_DIR [DATA_DIR ...] [--min-gap 40] [--every 2] [--threshold T ...]
        [--threads 2] [--json FILE]

    # e.g. on the folders benchmarks/accuracy.py --out acc keeps:
    python benchmarks/revisits.py acc/data/rotation_240x320_1000 acc/data/linear_240x320_1000

Decorrelation gives only |distance| per frame pair, and a wrong sign at one junction of the chain
mirrors everything after it (``speckle_rec/direction.py``). A frame that comes back to an earlier
pose (a fan swinging through the same angle again) ties the two ends of the chain together
whatever happened in between: a loop closure. This script measures whether that cue exists, on
tracked folders, before anyone builds on it.

Per scan, on every ``--every``-th frame, for pairs at least ``--min-gap`` frames apart:
- ``revisit_fraction``: frames with a partner whose patch centres lie within 1 mm RMS of their own
  plane (true poses): how often the scan comes back;
- a descriptor correlation per pair: both frames warped into frame 0's image coordinates with the
  chained in-plane motion the estimator measures (so in-plane slip and rocking do not count),
  reduced to ~0.9 mm pixels, rows deeper than 8 mm below the skin only (the skin layers hardly
  decorrelate), Pearson correlation over the overlap;
- at each ``--threshold``: the pairs it flags, the fraction of them truly within 2 and 5 mm RMS
  (precision), and the fraction of the truly-within-1-mm pairs it flags (recall);
- the median descriptor correlation per band of true RMS distance.
Prints one table (one row per folder and threshold); ``--json FILE`` writes every per-scan number.
"""

import sys
import time
from pathlib import Path

import cv2
import numpy as np

from cli.output import format_table, write_json
from speckle_rec.decorrelation import DecorrelationModel
from speckle_rec.evaluate import ScanTruth

from _machine import cell, folder_parser, machine_line, mean_known, scan_results, start_script
from trajectory_options import measure_scan, true_poses

DISTANCE_BANDS_MM = (0.0, 0.5, 1.0, 2.0, 5.0, np.inf)
SKIN_MM = 8.0  # rows this close to the top of the fan are left out (skin layers)
PIXEL_MM = 0.9  # descriptor pixel size


def descriptor_correlation(stack, mask, chain, spacing_mm, frames):
    """(F, F) Pearson correlation of ``frames`` after chained in-plane compensation.

    ``stack`` (N, H, W) frames, ``mask`` (H, W) imaged region, ``chain`` (N, 3, 3) the 2D image-mm
    transforms frame k → frame 0, ``spacing_mm`` (sx, sy). Each frame is warped into frame 0's
    pixels, reduced to ~``PIXEL_MM`` pixels and compared over the region both frames image.
    """
    sx, sy = spacing_mm
    to_mm = np.array([[sx, 0.0, sx], [0.0, sy, sy], [0.0, 0.0, 1.0]])
    to_px = np.linalg.inv(to_mm)
    h, w = mask.shape
    factor = max(1, int(round(PIXEL_MM / min(sx, sy))))
    size = (w // factor, h // factor)
    deep = mask.copy()
    deep[: np.nonzero(mask.any(axis=1))[0][0] + int(round(SKIN_MM / sy))] = False
    border = 2 * int(round(1.0 / min(sx, sy))) + 1  # keep 1 mm away from the fan's edge
    deep = cv2.erode(deep.astype(np.uint8), np.ones((border, border), np.uint8))
    values, inside = [], []
    for k in frames:
        frame0_to_k = (to_px @ np.linalg.inv(chain[k]) @ to_mm)[:2]
        flags = cv2.WARP_INVERSE_MAP
        image = cv2.warpAffine(stack[k].astype(np.float32), frame0_to_k, (w, h), flags=flags | cv2.INTER_LINEAR)
        region = cv2.warpAffine(deep, frame0_to_k, (w, h), flags=flags | cv2.INTER_NEAREST)
        values.append(cv2.resize(image, size, interpolation=cv2.INTER_AREA).ravel())
        inside.append(cv2.resize(region, size, interpolation=cv2.INTER_NEAREST).ravel() > 0)
    x = np.array(values, dtype=np.float64)
    m = np.array(inside, dtype=np.float64)
    count = np.maximum(m @ m.T, 1.0)
    sums = (x * m) @ m.T  # [i, j]: Σ x_i over the overlap of i and j
    squares = (x * x * m) @ m.T
    mean_i, mean_j = sums / count, sums.T / count
    var_i, var_j = squares / count - mean_i**2, squares.T / count - mean_j**2
    cross = ((x * m) @ (x * m).T) / count - mean_i * mean_j
    corr = cross / np.sqrt(np.maximum(var_i * var_j, 1e-12))
    return np.where(count >= 0.3 * m.sum(axis=1).min(), corr, np.nan)  # enough overlap


def run_scan(scan, calibration, *, min_gap, every, thresholds, threads):
    truth = ScanTruth.load(scan, calibration)
    # stride-1 pairs only: the chain and the patch grid are all this needs
    meas = measure_scan(scan, calibration, DecorrelationModel.default(), threads, strides=(1,))
    poses = true_poses(truth)
    picked = np.arange(0, poses.shape[0], every)
    first, second = np.triu_indices(picked.size, max(1, -(-min_gap // every)))
    i, j = picked[first], picked[second]
    centres = np.stack([meas.grid.x_mm, meas.grid.y_mm, np.zeros(len(meas.grid)), np.ones(len(meas.grid))])
    relative = np.linalg.solve(poses[i], poses[j])  # frame j → frame i
    distance = np.sqrt(np.mean((relative[:, 2, :] @ centres) ** 2, axis=1))  # RMS elevation, mm
    corr = descriptor_correlation(meas.stack, meas.mask, meas.chain, calibration.spacing_mm, picked)
    corr = corr[first, second]
    known = np.isfinite(corr)
    near = distance < 1.0
    revisited = np.zeros(picked.size, bool)
    revisited[first[near]] = revisited[second[near]] = True
    out = {"frames": int(poses.shape[0]), "pairs": int(i.size), "revisit_fraction": float(revisited.mean()),
           "median_correlation_by_distance": {}, "thresholds": {}}
    for lo, hi in zip(DISTANCE_BANDS_MM[:-1], DISTANCE_BANDS_MM[1:]):
        band = known & (distance >= lo) & (distance < hi)
        out["median_correlation_by_distance"][f"{lo:g}-{hi:g}"] = float(np.median(corr[band])) if band.any() else None
    for threshold in thresholds:
        flagged = known & (corr >= threshold)
        out["thresholds"][str(threshold)] = {
            "flagged": int(flagged.sum()),
            "within_2mm": float(np.mean(distance[flagged] < 2.0)) if flagged.any() else None,
            "within_5mm": float(np.mean(distance[flagged] < 5.0)) if flagged.any() else None,
            "recall_1mm": float(np.mean(flagged[near])) if near.any() else None,
        }
    return out


def main(argv=None):
    parser = folder_parser(__doc__, model=False)
    parser.add_argument("--min-gap", type=int, default=40, help="fewest frames between the two frames of a pair (default 40)")
    parser.add_argument("--every", type=int, default=2, help="use every k-th frame (default 2)")
    parser.add_argument("--threshold", type=float, action="append", help="descriptor correlation that flags a "
                        "revisit (repeatable; default 0.8 and 0.9)")
    args = parser.parse_args(argv)
    if args.min_gap < 1 or args.every < 1:
        parser.error("--min-gap and --every must be >= 1")
    thresholds = args.threshold or [0.8, 0.9]
    if not all(-1.0 <= t <= 1.0 for t in thresholds):
        parser.error("--threshold must lie in [-1, 1]")
    log, threads, machine, started = start_script(args.quiet, args.threads)
    results, rows = {}, []

    def measure(scan, calibration):
        return run_scan(scan, calibration, min_gap=args.min_gap, every=args.every, thresholds=thresholds,
                        threads=threads)

    def summary(numbers):
        by_distance = numbers["median_correlation_by_distance"]
        return (f"revisits {numbers['revisit_fraction']:.2f}, median correlation by RMS distance "
                + ", ".join(f"{band} mm {cell(v, 2)}" for band, v in by_distance.items()))

    for folder, per_scan in scan_results(args.data, measure, summary, log):
        results[str(folder)] = per_scan
        scans = list(per_scan.values())
        for threshold in thresholds:
            flagged = [s["thresholds"][str(threshold)] for s in scans]
            mean = {key: mean_known([f[key] for f in flagged])
                    for key in ("flagged", "within_2mm", "within_5mm", "recall_1mm")}
            rows.append([Path(folder).name, len(scans), cell(mean_known([s["revisit_fraction"] for s in scans]), 2),
                         f"{threshold:g}", f"{mean['flagged']:.0f}", cell(mean["within_2mm"], 3),
                         cell(mean["within_5mm"], 3), cell(mean["recall_1mm"], 3)])
    print(machine_line(machine, threads))
    print(format_table(["data", "scans", "revisits", "threshold", "flagged/scan", "<2 mm", "<5 mm", "recall <1 mm"],
                       rows))
    print(f"pairs >= {args.min_gap} frames apart, every {args.every} frame(s); {time.perf_counter() - started:.0f} s in all")
    if args.json:
        write_json(args.json, {"command": " ".join(sys.argv), "machine": machine, "min_gap": args.min_gap,
                               "every": args.every, "scans": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
