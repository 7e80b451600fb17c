"""The subcommands. Each registers its parser and runs by calling the library; no logic lives here."""

import sys

from speckle_rec.io import open_dataset
from speckle_rec.metrics import METRICS
from speckle_rec.progress import progress_bar

from .output import format_table, write_csv, write_json


def _fmt(mean, std=None, digits=3):
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f}±{std:.{digits}f}"


# ----------------------------------------------------------------------------------------- info
def register_info(sub, common):
    p = sub.add_parser("info", parents=[common], help="list the subjects and scans of a data folder",
                       description="Subjects, scans, frames, image size and, for tracked scans, the "
                                   "ground-truth motion (mean local / global pixel displacement in mm = "
                                   "the identity prediction's LPE / GPE).")
    p.add_argument("data", metavar="DATA_DIR", help="challenge data folder (train or test layout)")
    p.add_argument("--json", metavar="FILE", help="also write the summary as JSON ('-' for stdout)")
    p.set_defaults(run=run_info)


def run_info(args):
    from speckle_rec.evaluate import ScanTruth

    dataset = open_dataset(args.data)
    tracked = any(s.tracked for s in dataset.scans)
    calibration = dataset.calibration() if tracked else None
    rows, records = [], []
    for scan in progress_bar(dataset.scans, desc="info", unit="scan", enabled=not args.quiet):
        n, h, w = scan.shape()
        record = {"subject": scan.subject, "scan": scan.name, "frames": n, "height": h, "width": w,
                  "tracked": scan.tracked}
        if scan.tracked:
            truth = ScanTruth.load(scan, calibration)
            record.update(truth.identity_errors())
            if truth.landmarks is not None:
                record["landmarks"] = int(len(truth.landmarks))
        records.append(record)
        rows.append([scan.key, n, f"{h}x{w}", "yes" if scan.tracked else "no",
                     _fmt(record.get("LPE")), _fmt(record.get("GPE")),
                     _fmt(record.get("LLE")), _fmt(record.get("GLE"))])
    subjects = sorted({s.subject for s in dataset.scans})
    print(f"{dataset.root}: {dataset.layout} layout, {len(subjects)} subject(s), {len(dataset.scans)} scan(s), "
          f"{sum(r['frames'] for r in records)} frames")
    print(format_table(["scan", "frames", "size", "tracked", "local mm", "global mm", "local lm mm",
                        "global lm mm"], rows))
    if args.json:
        write_json(args.json, {"data": str(dataset.root), "layout": dataset.layout, "subjects": subjects,
                               "scans": records})
    return 0


# ------------------------------------------------------------------------------------- evaluate
def register_evaluate(sub, common):
    p = sub.add_parser("evaluate", parents=[common], help="score prediction folders against ground truth",
                       description="Score one or more prediction folders (PRED/<subject>/<scan>.h5) with the "
                                   "challenge metrics on a tracked data folder. One row per method, named "
                                   "after its folder, plus 'identity'. 'score' is the TUS-REC2025 final score "
                                   "(1 - M/M_identity averaged over GPE, GLE, LPE, LLE); 'score 2024' the "
                                   "min-max score across the compared methods.")
    p.add_argument("predictions", nargs="+", metavar="PRED_DIR", help="prediction folder(s)")
    p.add_argument("--data", required=True, metavar="DATA_DIR", help="tracked data folder with landmarks")
    p.add_argument("--scans", metavar="GLOB", help="only scans whose SUBJECT/SCAN matches this glob")
    p.add_argument("--json", metavar="FILE", help="write all results as JSON ('-' for stdout)")
    p.add_argument("--csv", metavar="FILE", help="write per-scan results as CSV")
    p.set_defaults(run=run_evaluate)


def run_evaluate(args):
    from speckle_rec.evaluate import SCORE_KEYS, evaluate

    dataset = open_dataset(args.data)
    if args.scans:
        dataset = dataset.select(args.scans)
    results = evaluate(dataset, args.predictions, progress=not args.quiet)
    columns = list(METRICS) + ["score", "global", "local", "pixel", "landmark", "score_2024"]
    rows = []
    for name, entry in results["methods"].items():
        mean, std = entry["mean"], entry["std"]
        n_scans = len(entry["scans"])
        time = _fmt(mean.get("wall_time_s"), std.get("wall_time_s"), 2)
        rows.append([name] + [_fmt(mean.get(c), std.get(c)) for c in columns] + [time, n_scans])
        if entry["missing"]:
            print(f"warning: {name} has no prediction for {len(entry['missing'])} of {len(results['scans'])} "
                  f"scan(s), e.g. {entry['missing'][0]}; its means use the others", file=sys.stderr)
    headers = ["method"] + [f"{c} mm" for c in METRICS] + [c.replace("_", " ") for c in columns[4:]] + \
        ["time s", "scans"]
    print(format_table(headers, rows))
    if args.json:
        write_json(args.json, results)
    if args.csv:
        keys = list(METRICS) + list(SCORE_KEYS) + ["wall_time_s"]
        write_csv(args.csv, ["method", "scan"] + keys,
                  [[name, key] + [row.get(k) for k in keys]
                   for name, entry in results["methods"].items() for key, row in entry["scans"].items()])
    return 0


REGISTRY = [register_info, register_evaluate]
