"""Does anatomy sliding in the image carry the sign of out-of-plane motion, across quiet stretches too?

Usage:
    python benchmarks/anatomy_slide.py DATA_DIR [DATA_DIR ...] --model CALIB.json [--threads 2]
        [--json FILE]

    # e.g. on the rotation folder benchmarks/accuracy.py --out acc keeps:
    python benchmarks/anatomy_slide.py acc/data/rotation_240x320_1000 \\
        --model acc/calibration/240x320_1000_seed2.json

Why (the physics is in :mod:`speckle_rec.slide`): two key steps taken from about the same view
slide alike when they move the same way and oppositely when they do not, however far apart in time.
The rotation protocol comes back to its upright view after each phase, so such pairs can straddle
the quiet stretches (the in-plane rock) that decorrelation cannot carry the sign across.

Per scan: the key steps, their |plane| fits and the sign DP's signs are computed as
:func:`speckle_rec.trajectory.estimate_trajectory` does (without ``slide``), and each step's true
sign (agreement with the true step at the anchors, ``trajectory_options.true_key_signs``) is taken
from the tracker. Two steps' cue is the cosine of their slide fields
(:func:`speckle_rec.slide.slide_fields`), whose sign should be the product of their true signs.
Only moving steps count (:func:`speckle_rec.slide.moving_steps`), and only pairs with
``|cosine| > MIN_COSINE``.

- ``DP adjacent``: the share of consecutive moving steps the DP relates as the truth does;
- ``adjacent``: consecutive moving steps (cue right: the share the cosine relates as the truth);
- ``same view``: :func:`speckle_rec.slide.same_view_pairs`;
- ``stretches``: each quiet stretch (:func:`speckle_rec.slide.quiet_stretches`). ``cue right``
  counts those where the same-view pairs straddling the run, with the true signs, sum to a
  positive agreement (the cue gives the true relation of the two sides); ``DP right`` those where
  the DP's signs relate the steps just before and after the run as the truth does.

A second table gives, per folder, the same-view pairs of every |cosine| (``MIN_COSINE`` not
applied) in bins of ``COSINE_BINS``, and the share of each bin whose cosine has the true sign:
what ``MIN_COSINE`` is chosen from.
"""

import sys
import time
from pathlib import Path

import numpy as np

from cli.output import format_table, write_json
from speckle_rec import trajectory
from speckle_rec.decorrelation import DecorrelationModel
from speckle_rec.evaluate import ScanTruth
from speckle_rec.slide import (
    MIN_COSINE,
    moving_steps,
    quiet_stretches,
    same_view_pairs,
    slide_fields,
    view_similarity,
)

from _machine import cell, folder_parser, machine_line, scan_results, start_script
from trajectory_options import measure_scan, true_key_signs

COSINE_BINS = (0.05, 0.1, 0.15, 0.2, 0.3, 1.0)


def pair_accuracy(cosine, relation, use):
    """(pairs used, share whose cosine has the sign of the true relation)."""
    count = int(use.sum())
    return count, (float(np.mean(np.sign(cosine[use]) == relation[use])) if count else None)


def run_scan(scan, calibration, model, threads):
    truth = ScanTruth.load(scan, calibration)
    meas = measure_scan(scan, calibration, model, threads)
    opts = trajectory._check_options({})
    keys, step_rho, step_theta = trajectory._key_steps(meas, opts["key_rho"])
    free = trajectory.fit_planes(step_rho, step_theta, meas, f_scale=opts["f_scale"],
                                 rho_sigma_floor=opts["rho_sigma_floor"])
    _, planes, covariance, _ = trajectory._decide_pivot(meas, step_rho, step_theta, free, opts)
    dp_signs, _ = trajectory._resolve_key_signs(meas, keys, planes, covariance, opts, threads)
    true_signs = true_key_signs(meas, truth)(keys, planes).astype(np.int64)
    moving = moving_steps(planes @ trajectory._anchor_design(meas).T)

    fields = slide_fields(meas.stack, meas.mask, meas.spacing, keys, planes, model=meas.model,
                          threads=threads)
    cosine = fields @ fields.T
    relation = true_signs[:, None] * true_signs[None, :]
    similarity = view_similarity(meas.stack, (keys[:-1] + keys[1:]) // 2, meas.spacing)
    first, second, _ = same_view_pairs(fields, similarity, moving)
    same_view = np.zeros(cosine.shape, bool)
    same_view[first, second] = True
    all_first, all_second, all_cosine = same_view_pairs(fields, similarity, moving, min_cosine=0.0)
    right = np.sign(all_cosine) == relation[all_first, all_second]
    by_cosine = []
    for low, high in zip(COSINE_BINS[:-1], COSINE_BINS[1:]):
        use = (np.abs(all_cosine) >= low) & (np.abs(all_cosine) < high if high < 1 else True)
        by_cosine.append([int(use.sum()), int(np.sum(use & right))])
    adjacent = np.zeros(cosine.shape, bool)
    steps = np.arange(keys.size - 2)
    adjacent[steps, steps + 1] = moving[:-1] & moving[1:] & (np.abs(cosine[steps, steps + 1]) > MIN_COSINE)

    stretches = []
    for start, end in quiet_stretches(moving):
        before, after = np.nonzero(same_view[:start, end + 1:])
        after = after + end + 1
        agreement = float(np.sum(true_signs[before] * true_signs[after] * cosine[before, after]))
        truth_across = true_signs[start - 1] * true_signs[end + 1]
        stretches.append({"steps": [int(start), int(end)], "pairs": int(before.size),
                          "cue_right": bool(before.size and agreement > 0),
                          "dp_right": bool(dp_signs[start - 1] * dp_signs[end + 1] == truth_across)})
    out = {"key_steps": int(keys.size - 1), "moving": int(moving.sum()), "stretches": stretches,
           "same_view_by_cosine": by_cosine}
    for name, use in (("adjacent", adjacent), ("same_view", same_view)):
        out[f"{name}_pairs"], out[f"{name}_accuracy"] = pair_accuracy(cosine, relation, use)
    dp_relation = dp_signs[1:] * dp_signs[:-1]
    true_relation = true_signs[1:] * true_signs[:-1]
    both = moving[1:] & moving[:-1]
    agree = dp_relation[both] == true_relation[both]
    out["dp_adjacent_accuracy"] = float(np.mean(agree)) if both.any() else None
    return out


def main(argv=None):
    parser = folder_parser(__doc__, json_help="write every scan's numbers as JSON")
    args = parser.parse_args(argv)
    model = DecorrelationModel.from_json(args.model)
    log, threads, machine, started = start_script(args.quiet, args.threads)

    def measure(scan, calibration):
        return run_scan(scan, calibration, model, threads)

    def summary(numbers):
        return f"{numbers['key_steps']} key steps, {len(numbers['stretches'])} quiet stretches"

    results, rows, bin_rows = {}, [], []
    for folder, per_scan in scan_results(args.data, measure, summary, log):
        results[str(folder)] = per_scan
        counts = np.sum([numbers["same_view_by_cosine"] for numbers in per_scan.values()], axis=0)
        bin_rows.append([Path(folder).name] + [f"{total}, {cell(right / total if total else None, 3)}"
                                               for total, right in counts])
        for key, numbers in per_scan.items():
            stretches = [s for s in numbers["stretches"] if s["pairs"]]
            rows.append([Path(folder).name, key, numbers["key_steps"],
                         cell(numbers["dp_adjacent_accuracy"], 3),
                         numbers["adjacent_pairs"], cell(numbers["adjacent_accuracy"], 3),
                         numbers["same_view_pairs"], cell(numbers["same_view_accuracy"], 3),
                         f"{len(stretches)} of {len(numbers['stretches'])}",
                         sum(s["cue_right"] for s in stretches), sum(s["dp_right"] for s in stretches)])
    print(machine_line(machine, threads))
    header = ["data", "scan", "key steps", "DP adjacent", "adjacent pairs", "cue right", "same-view pairs",
              "cue right", "stretches with pairs", "cue right", "DP right"]
    print(format_table(header, rows))
    bins = zip(COSINE_BINS[:-1], COSINE_BINS[1:])
    print(format_table(["data"] + [f"|cos| {low}-{high}" for low, high in bins], bin_rows))
    print(f"model {args.model}; {time.perf_counter() - started:.0f} s in all")
    if args.json:
        write_json(args.json, {"command": " ".join(sys.argv), "machine": machine, "model": args.model,
                               "folders": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
