"""Does the sign stage's stop test tell a turn from a pause, and what does it mend?

Usage:
    python benchmarks/stops.py DATA_DIR [DATA_DIR ...] --model CALIB.json [--threads 2] [--json FILE]

    # e.g. on the rotation folders benchmarks/accuracy.py --out acc keeps:
    python benchmarks/stops.py acc/data/rotation_240x320_1000 --model acc/calibration/240x320_1000_seed2.json
    python benchmarks/stops.py acc/data/rotation_480x640_1600 --model acc/calibration/480x640_1000_seed2.json

Why: the hand eases into and out of every stop, so the sign DP can hardly tell a turn from a pause
there (:mod:`speckle_rec.direction`). After the DP the key frames on the two sides of each stop are
correlated across it, and a high gain (:func:`speckle_rec.direction.reversal_gain`) calls a turn
(:func:`speckle_rec.trajectory._reverse_at_stops`).

Per scan: the frames are measured and the trajectory estimated as
:func:`speckle_rec.trajectory.estimate_trajectory` does; its diagnostics list every stop tested.
A stop is a true *turn* when the true motions over the ``STOP_RELATION_STEPS`` key steps before and
after it (elevations at the anchors) point opposite ways, else a *pause*. Only stops with moving
key steps on both sides count (the others have no cosine and are never acted on). Per folder:
the turns, their median gain and how many the test calls, how many the signs before the test put
as going on (the DP's error) and how many of those it flipped; the pauses, their largest gain, how
many the test calls a turn and how many of those it flipped (a right relation broken).
"""

import sys
import time
from pathlib import Path

import numpy as np

from cli.output import format_table, write_json
from speckle_rec import trajectory
from speckle_rec.decorrelation import DecorrelationModel
from speckle_rec.evaluate import ScanTruth

from _machine import cell, folder_parser, machine_line, scan_results, start_script
from trajectory_options import measure_scan, pair_planes, true_poses


def true_turns(tested, poses, keys, anchors):
    """The stage's stop tests (``signs.stops.tested`` of the diagnostics), each with ``true_turn``:
    whether the true motion over the ``STOP_RELATION_STEPS`` key steps on either side reverses."""
    if not tested:
        return []
    steps, last = trajectory.STOP_RELATION_STEPS, keys.size - 1
    a, b = np.array([test["steps"] for test in tested]).T
    before = pair_planes(poses, keys[np.maximum(a - steps, 0)], keys[a]) @ anchors.T
    after = pair_planes(poses, keys[b + 1], keys[np.minimum(b + 1 + steps, last)]) @ anchors.T
    turns = np.sum(before * after, axis=1) < 0
    return [dict(test, true_turn=bool(turn)) for test, turn in zip(tested, turns)]


def run_scan(scan, calibration, model, threads):
    truth = ScanTruth.load(scan, calibration)
    meas = measure_scan(scan, calibration, model, threads)
    result = trajectory._estimate(meas, trajectory._check_options(dict(first_direction=None)), False, {},
                                  threads=threads)
    stops = result.diagnostics["signs"]["stops"]
    keys = np.asarray(result.diagnostics["key_frames"], dtype=np.int64)
    tested = [t for t in stops["tested"] if t["cosine"] is not None]
    return {"stops": len(stops["tested"]), "seconds": stops["seconds"],
            "tested": true_turns(tested, true_poses(truth), keys, trajectory._anchor_design(meas))}


def summarise(rows):
    """Table cells: turns, their median gain, called, went on before, mended; pauses, their largest
    gain, called, broken."""
    out = []
    for turn in (True, False):
        group = [row for row in rows if row["true_turn"] == turn]
        gains = [row["gain"] for row in group]
        called = sum(row["turn"] for row in group)
        flipped = sum(row["flipped"] for row in group)
        if turn:
            went_on = sum(row["cosine"] > 0 for row in group)
            out += [str(len(group)), cell(float(np.median(gains)) if gains else None, 3), str(called),
                    str(went_on), str(flipped)]
        else:
            out += [str(len(group)), cell(max(gains) if gains else None, 3), str(called), str(flipped)]
    return out


def main(argv=None):
    parser = folder_parser(__doc__, json_help="write every stop tested as JSON")
    args = parser.parse_args(argv)
    model = DecorrelationModel.from_json(args.model)
    log, threads, machine, started = start_script(args.quiet, args.threads)

    def measure(scan, calibration):
        return run_scan(scan, calibration, model, threads)

    def summary(numbers):
        rows = numbers["tested"]
        return (f"{numbers['stops']} stops, {len(rows)} with moving sides, "
                f"{sum(r['true_turn'] for r in rows)} turns, {sum(r['flipped'] for r in rows)} flipped")

    results, table = {}, []
    for folder, per_scan in scan_results(args.data, measure, summary, log):
        results[str(folder)] = per_scan
        rows = [row for numbers in per_scan.values() for row in numbers["tested"]]
        seconds = np.mean([numbers["seconds"] for numbers in per_scan.values()])
        table.append([Path(folder).name, *summarise(rows), cell(float(seconds), 2)])
    print(machine_line(machine, threads))
    header = ["data", "turns", "gain (median)", "called", "went on", "mended", "pauses", "gain (max)",
              "called", "broken", "s/scan"]
    print(format_table(header, table))
    print(f"model {args.model}; a turn is called above a gain of {trajectory.STOP_MIN_GAIN} with the sides' "
          f"|cosine| above {trajectory.STOP_MIN_COS}; {time.perf_counter() - started:.0f} s in all")
    if args.json:
        write_json(args.json, {"command": " ".join(sys.argv), "machine": machine, "model": args.model,
                               "folders": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
