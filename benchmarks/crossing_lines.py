"""Do crossing image planes share their line of anatomy, and can that decide a sign junction?

Usage:
    python benchmarks/crossing_lines.py DATA_DIR [DATA_DIR ...] --model CALIB.json [--pairs 40]
        [--every 10] [--seed 0] [--threads 2] [--json FILE]

    # e.g. on the rotation folder benchmarks/accuracy.py --out acc keeps:
    python benchmarks/crossing_lines.py acc/data/rotation_240x320_1000 \\
        --model acc/calibration/240x320_1000_seed2.json

Why: two frames whose planes cross at a clear angle image the same tissue along their line of
intersection, so their pixels along that line correlate. Flipping the out-of-plane direction of
the motion after a key frame ``k`` moves every later plane, and with it the line each later frame
shares with the earlier ones. A pair that straddles ``k`` can thus test the sign junction at
``k``, however far apart in time (the rock phase between two fans of the rotation protocol has
no out-of-plane motion to carry the relative sign across, see :mod:`speckle_rec.direction`).

Per scan: the frames are measured and the trajectory estimated as
:func:`speckle_rec.trajectory.estimate_trajectory` does, then mirrored to the true first
direction. Each key junction (between key steps that both move ≥ ``MIN_STEP_MM`` RMS at the
anchors) is *wrong* when the estimated and the true poses disagree on whether the two steps go
the same way. All wrong junctions and every ``--every``-th right one are tested: over up to
``--pairs`` random pairs ``i ≤ k < j`` whose planes cross (see ``line_correlation``), the
flip gain is the mean line correlation with the motion after ``k`` mirrored through frame ``k``'s
plane, minus that with the poses as they are (column ``line ρ``: the mean of the latter over the
tested junctions' pairs). This is done twice, on the true poses and on the estimated ones. On the
true poses a flip should lower the line correlation at every junction. On the estimated ones the
test decides a junction when the gain is positive where the junction is wrong and negative where
it is right.

Line correlation: :func:`speckle_rec.crossing.line_correlation` of the band-passed frames
(:func:`speckle_rec.crossing.band_pass` of ``meas.stack``, the frames smoothed as the model
measures), as the slide stage's step 3 uses it; there the pairs come only from the two runs of key
steps beside an unlinked quiet stretch (:func:`speckle_rec.crossing.flip_gain`), here from the whole
scan.

A second table judges the estimate's own step-3 tests (``signs.slide.runs.lines`` of its
diagnostics): per folder the tests, how many found their two runs' relation wrong, how many of
those and of the right ones it flipped, and the share of (wrong, right) pairs of tests whose gains
order them (1: a margin could split them all; 0.5: chance).

The band-passed stack is held in memory as float32 (300 MB for 1000 frames at 240×320, 2 GB
for 1600 frames at 480×640).
"""

import sys
import time
from pathlib import Path

import numpy as np

from cli.output import format_table, write_json
from speckle_rec import trajectory
from speckle_rec.crossing import band_pass, flipped_after, line_correlation
from speckle_rec.decorrelation import DecorrelationModel
from speckle_rec.direction import first_direction, mirror
from speckle_rec.evaluate import ScanTruth
from speckle_rec.slide import step_travel

from _machine import cell, folder_parser, machine_line, scan_results, start_script
from trajectory_options import measure_scan, pair_planes, true_poses

MIN_STEP_MM = 0.1


def sampled_gain(images, mask, spacing, poses, k, rng, pairs):
    """Flipping the motion after frame k, over random crossing pairs i ≤ k < j: (mean gain, mean line
    correlation with the poses as they are, pairs used); NaNs when no pair crosses."""
    n = poses.shape[0]
    flipped = flipped_after(poses, k)
    gains, levels = [], []
    for _ in range(4 * pairs):
        if len(gains) == pairs:
            break
        i, j = int(rng.integers(0, k + 1)), int(rng.integers(k + 1, n))
        kept = line_correlation(images[i], images[j], mask, spacing, np.linalg.solve(poses[i], poses[j]))
        moved = line_correlation(images[i], images[j], mask, spacing, np.linalg.solve(flipped[i], flipped[j]))
        if np.isfinite(kept) and np.isfinite(moved):
            gains.append(moved - kept)
            levels.append(kept)
    if not gains:
        return np.nan, np.nan, 0
    return float(np.mean(gains)), float(np.mean(levels)), len(gains)


def step_elevations(poses, keys, anchors):
    """(K − 1, A) each key step's out-of-plane motion at the anchors (mm)."""
    return pair_planes(poses, keys[:-1], keys[1:]) @ anchors.T


def step_relations(elevation):
    """(K − 2,) +1 where key steps m and m + 1 move the same way at the anchors, −1 where opposite;
    and (K − 1,) the RMS anchor elevation of each step (mm), from :func:`step_elevations`."""
    same = np.sum(elevation[1:] * elevation[:-1], axis=1) >= 0
    return np.where(same, 1, -1), step_travel(elevation)


def step3_rows(tests, estimated_steps, true_steps, keys):
    """The slide stage's step-3 tests (``signs.slide.runs.lines.tested`` of the diagnostics), each
    with ``wrong_before``: whether the relation of its two runs was wrong before the test.

    A run's direction agrees with the truth where its key steps (those overlapping the run's paired
    frames) agree in sign with the true steps at the anchors (:func:`step_elevations` of the final
    and the true poses), weighted by their true travel. The relation is judged on the final poses
    and undone for a test that flipped.
    """
    agreement = np.sign(np.sum(estimated_steps * true_steps, axis=1)) * step_travel(true_steps)

    def direction(first, last):
        return np.sign(agreement[(keys[1:] > first) & (keys[:-1] < last)].sum())

    rows = []
    for test in tests:
        right_after = direction(*test["before"]) == direction(*test["after"])
        rows.append(dict(test, wrong_before=bool(right_after == test["flipped"])))
    return rows


def run_scan(scan, calibration, model, threads, *, pairs, every, seed):
    truth = ScanTruth.load(scan, calibration)
    meas = measure_scan(scan, calibration, model, threads)
    opts = trajectory._check_options(dict(first_direction=None))
    result = trajectory._estimate(meas, opts, False, {})
    points = np.stack([meas.grid.x_mm, meas.grid.y_mm], axis=1)
    frame_to_first = result.frame_to_first
    if first_direction(frame_to_first, points) != first_direction(truth.frame_to_first, points):
        frame_to_first = mirror(frame_to_first)
    estimated = np.concatenate([np.eye(4)[None], frame_to_first])
    true = true_poses(truth)
    keys = np.asarray(result.diagnostics["key_frames"], dtype=np.int64)
    anchors = trajectory._anchor_design(meas)
    true_steps = step_elevations(true, keys, anchors)
    estimated_steps = step_elevations(estimated, keys, anchors)
    true_relation, true_size = step_relations(true_steps)
    estimated_relation, _ = step_relations(estimated_steps)
    moving = (true_size[1:] >= MIN_STEP_MM) & (true_size[:-1] >= MIN_STEP_MM)
    wrong = estimated_relation != true_relation
    right_index = np.nonzero(moving & ~wrong)[0]
    tested = np.union1d(np.nonzero(moving & wrong)[0], right_index[::every])
    images = band_pass(meas.stack, meas.spacing)
    rng = np.random.default_rng(seed)
    rows = []
    for m in tested:
        k = int(keys[m + 1])
        row = {"frame": k, "wrong": bool(wrong[m])}
        for name, poses in (("true", true), ("estimated", estimated)):
            row[f"gain_{name}"], row[f"rho_{name}"], row[f"pairs_{name}"] = sampled_gain(
                images, meas.mask, meas.spacing, poses, k, rng, pairs)
        rows.append(row)
    slide = result.diagnostics.get("signs", {}).get("slide")
    lines = slide.get("runs", {}).get("lines", {}) if isinstance(slide, dict) else {}
    step3 = step3_rows(lines.get("tested", []), estimated_steps, true_steps, keys)
    return {"junctions": int(moving.sum()), "wrong": int(np.sum(moving & wrong)), "tested": rows,
            "step3": step3}


def summarise(junctions, poses):
    """Table cells for one pose set: the mean line correlation as is; right junctions' mean gain and
    share < 0; wrong ones' mean gain and share > 0."""
    levels = np.array([row[f"rho_{poses}"] for row in junctions])
    levels = levels[np.isfinite(levels)]
    out = [cell(float(np.mean(levels)) if levels.size else None, 3)]
    for wrong, better in ((False, np.less), (True, np.greater)):
        gains = np.array([row[f"gain_{poses}"] for row in junctions if row["wrong"] == wrong])
        gains = gains[np.isfinite(gains)]
        if poses == "true" and wrong:
            out += ["-", "-", "-"]
            continue
        out += [str(gains.size), cell(float(np.mean(gains)) if gains.size else None, 3),
                cell(float(np.mean(better(gains, 0.0))) if gains.size else None, 2)]
    return out


def summarise_step3(tests):
    """Table cells: tests, wrong before, wrong ones flipped, right ones flipped, and the share of
    (wrong, right) test pairs whose gains order them (the area under the ROC curve)."""
    gains = np.array([np.nan if t["gain"] is None else t["gain"] for t in tests], dtype=float)
    wrong = np.array([t["wrong_before"] for t in tests], dtype=bool)
    flipped = np.array([t["flipped"] for t in tests], dtype=bool)
    high, low = gains[wrong & np.isfinite(gains)], gains[~wrong & np.isfinite(gains)]
    order = (np.mean((high[:, None] > low[None, :]) + 0.5 * (high[:, None] == low[None, :]))
             if high.size and low.size else None)
    return [str(len(tests)), str(int(wrong.sum())), str(int(np.sum(wrong & flipped))),
            str(int(np.sum(~wrong & flipped))), cell(order, 3)]


def main(argv=None):
    parser = folder_parser(__doc__, json_help="write every tested junction as JSON")
    parser.add_argument("--pairs", type=int, default=40, help="crossing pairs per junction (default 40)")
    parser.add_argument("--every", type=int, default=10, help="test every n-th right junction (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pair sampling (default 0)")
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.every < 1:
        parser.error("--pairs and --every must be at least 1")
    model = DecorrelationModel.from_json(args.model)
    log, threads, machine, started = start_script(args.quiet, args.threads)

    def measure(scan, calibration):
        return run_scan(scan, calibration, model, threads, pairs=args.pairs, every=args.every, seed=args.seed)

    def summary(numbers):
        tested = len(numbers["tested"])
        return f"{numbers['wrong']} wrong of {numbers['junctions']} junctions, {tested} tested"

    results, rows, step3 = {}, [], []
    for folder, per_scan in scan_results(args.data, measure, summary, log):
        results[str(folder)] = per_scan
        tested = [row for numbers in per_scan.values() for row in numbers["tested"]]
        for poses in ("true", "estimated"):
            rows.append([Path(folder).name, poses, *summarise(tested, poses)])
        tests = [test for numbers in per_scan.values() for test in numbers["step3"]]
        step3.append([Path(folder).name, *summarise_step3(tests)])
    print(machine_line(machine, threads))
    header = ["data", "poses", "line ρ", "right", "gain", "share < 0", "wrong", "gain", "share > 0"]
    print(format_table(header, rows))
    print("\nstep 3 of the slide stage, its tests in the estimate:")
    header = ["data", "tests", "wrong before", "wrong flipped", "right flipped", "gain orders"]
    print(format_table(header, step3))
    print(f"model {args.model}; {args.pairs} pairs per junction, 1 in {args.every} right junctions, "
          f"seed {args.seed}; {time.perf_counter() - started:.0f} s in all")
    if args.json:
        write_json(args.json, {"command": " ".join(sys.argv), "machine": machine, "model": args.model,
                               "folders": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
