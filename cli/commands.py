"""The subcommands. Each registers its parser and runs by calling the library; no logic lives here."""

import sys

from speckle_rec.io import open_dataset
from speckle_rec.metrics import METRICS
from speckle_rec.progress import progress_bar

from .commands_calibrate import register_calibrate
from .commands_viz import register_plot, register_volume
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


def print_results(results):
    """The evaluate table on stdout; missing predictions as warnings on stderr."""
    columns = list(METRICS) + ["score", "global", "local", "pixel", "landmark", "score_2024"]
    rows = []
    for name, entry in results["methods"].items():
        mean, std = entry["mean"], entry["std"]
        time = _fmt(mean.get("wall_time_s"), std.get("wall_time_s"), 2)
        rows.append([name] + [_fmt(mean.get(c), std.get(c)) for c in columns] + [time, len(entry["scans"])])
        if entry["missing"]:
            print(f"warning: {name} has no prediction for {len(entry['missing'])} of {len(results['scans'])} "
                  f"scan(s), e.g. {entry['missing'][0]}; its means use the others", file=sys.stderr)
    headers = ["method"] + [f"{c} mm" for c in METRICS] + [c.replace("_", " ") for c in columns[4:]] + \
        ["time s", "scans"]
    print(format_table(headers, rows))


def run_evaluate(args):
    from speckle_rec.evaluate import SCORE_KEYS, evaluate

    dataset = open_dataset(args.data, scans=args.scans)
    results = evaluate(dataset, args.predictions, progress=not args.quiet)
    print_results(results)
    if args.json:
        write_json(args.json, results)
    if args.csv:
        keys = list(METRICS) + list(SCORE_KEYS) + ["wall_time_s"]
        write_csv(args.csv, ["method", "scan"] + keys,
                  [[name, key] + [row.get(k) for k in keys]
                   for name, entry in results["methods"].items() for key, row in entry["scans"].items()])
    return 0


# ------------------------------------------------------------------------------------- simulate
def register_simulate(sub, common):
    from speckle_rec.simulate.motion import PROTOCOLS

    p = sub.add_parser("simulate", parents=[common], help="simulate tracked scans in the challenge layout",
                       description="Simulate freehand scans from speckle physics with exact ground truth and "
                                   "write them as a challenge data folder (calib_matrix.csv, landmarks, tforms).")
    p.add_argument("out", metavar="OUT_DIR", help="folder to write (created)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="rotation",
                   help="rotation = TUS-REC2025 (LH/RH_rotation); linear, c-shape, s-shape = TUS-REC2024 "
                        "sweeps ({LH,RH}_{Per,Par}_{L,C,S}_{DtP,PtD}); default rotation")
    p.add_argument("--subjects", nargs="+", default=["000"], metavar="SID", help="subject folder names")
    p.add_argument("--frames", type=int, default=1500, metavar="N", help="frames per scan (default 1500)")
    p.add_argument("--layout", choices=("train", "test"), default="train",
                   help="train: frames_transfs/; test: frames/, transfs/, dataset_keys.h5")
    p.add_argument("--height", type=int, default=480, help="image rows (default 480)")
    p.add_argument("--width", type=int, default=640, help="image columns (default 640)")
    p.add_argument("--hands", nargs="+", choices=("LH", "RH"), default=["LH", "RH"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run_simulate)


def run_simulate(args):
    from speckle_rec.errors import DataError
    from speckle_rec.simulate.dataset import protocol_scans, simulate_dataset
    from speckle_rec.simulate.probe import Probe

    if args.frames < 2 or args.height < 16 or args.width < 16:
        raise DataError(f"need --frames >= 2 and an image of at least 16x16, got {args.frames} frames of "
                        f"{args.height}x{args.width}")
    if any(not s or "/" in s or s.startswith(".") for s in args.subjects):
        raise DataError(f"invalid subject names {args.subjects}")
    total = len(args.subjects) * len(protocol_scans(args.protocol, hands=args.hands)) * args.frames
    probe = Probe.fit_image(args.height, args.width)
    with progress_bar(total=total, desc="simulate", unit="frame", enabled=not args.quiet) as bar:
        scans = simulate_dataset(args.out, protocol=args.protocol, subjects=args.subjects, n_frames=args.frames,
                                 layout=args.layout, probe=probe, seed=args.seed, hands=args.hands,
                                 on_chunk=bar.update)
    print(f"wrote {len(scans)} scan(s) of {args.frames} frames ({args.height}x{args.width}) to {args.out}",
          file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------- reconstruct
def register_reconstruct(sub, common):
    p = sub.add_parser("reconstruct", parents=[common], help="estimate every scan's trajectory from its frames",
                       description="Reconstruct every scan of a data folder (train or test layout) from the images "
                                   "alone into a prediction folder PRED/<subject>/<scan>.h5 (global and local "
                                   "transforms; with --ddf also GP, GL, LP, LL). Finished scans are skipped on a "
                                   "rerun; a failing scan is reported and the others go on; exit 1 if any failed.")
    p.add_argument("data", metavar="DATA_DIR")
    p.add_argument("-o", "--out", required=True, metavar="PRED_DIR", help="prediction folder to write")
    p.add_argument("--calibration", metavar="CALIB.json",
                   help="decorrelation calibration from 'speckle-rec calibrate', with its first-direction prior "
                        "(default: the packaged curves and the +1 direction convention)")
    p.add_argument("--ddf", action="store_true", help="also write the four challenge DDFs (large: ~12 GB a scan)")
    p.add_argument("--no-slide", dest="slide", action="store_false",
                   help="skip the anatomy-slide sign stage, which decides the out-of-plane sign across quiet "
                        "stretches of scans that fan about a fixed skin contact (it costs about 1 s per "
                        "1000-frame 240x320 scan, 3-4 s per 1600-frame 480x640 one)")
    p.add_argument("--no-level", dest="level_sweeps", action="store_false",
                   help="do not level sweeps: by default, on scans without a fixed skin contact, the depth "
                        "gradient of the decorrelation curves is fitted per scan so that the sweep ends at the "
                        "tilt about image x it started with")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="scans at once, one process each")
    p.add_argument("--scans", metavar="GLOB", help="only scans whose SUBJECT/SCAN matches this glob")
    p.add_argument("--overwrite", action="store_true", help="recompute scans that are already finished")
    p.add_argument("--json", metavar="FILE", help="write the summary as JSON ('-' for stdout)")
    p.set_defaults(run=run_reconstruct)


def run_reconstruct(args):
    from speckle_rec.decorrelation import DecorrelationModel
    from speckle_rec.direction import DirectionPrior
    from speckle_rec.reconstruct import reconstruct_dataset

    dataset = open_dataset(args.data, scans=args.scans)
    model = DecorrelationModel.from_json(args.calibration) if args.calibration else None
    prior = DirectionPrior.from_json(args.calibration) if args.calibration else None
    if not args.quiet:
        names = sorted({scan.name for scan in dataset.scans})
        chosen = [(name, *(prior or DirectionPrior()).choose(name)) for name in names]
        print("first out-of-plane direction (the mirror speckle cannot decide): "
              + ", ".join(f"{name} {d:+d} ({basis})" for name, d, basis in chosen), file=sys.stderr)
    summary = reconstruct_dataset(dataset, args.out, model=model, direction_prior=prior, ddf=args.ddf,
                                  slide=args.slide, level_sweeps=args.level_sweeps, jobs=args.jobs,
                                  threads=args.threads, overwrite=args.overwrite, progress=not args.quiet)
    if args.json:
        write_json(args.json, {"out": str(args.out), "done": summary.done, "skipped": summary.skipped,
                               "failed": summary.failed})
    return _report(summary, "reconstructed", args.out)


# -------------------------------------------------------------------------------------- predict
def register_predict(sub, common):
    p = sub.add_parser("predict", parents=[common], help="run any challenge predict_ddfs over a data folder",
                       description="Run a challenge-style predict_ddfs(frames, landmark, data_path_calib[, device]) "
                                   "(a learned model's submission, or speckle_rec:predict_ddfs) on every scan, "
                                   "timing each call like the challenge does, and save GP, GL, LP, LL with the "
                                   "wall time in the prediction format for 'speckle-rec evaluate'.")
    p.add_argument("data", metavar="DATA_DIR")
    p.add_argument("--function", required=True, metavar="MODULE:CALLABLE",
                   help="e.g. submission/predict_ddfs.py:predict_ddfs or speckle_rec:predict_ddfs")
    p.add_argument("-o", "--out", required=True, metavar="PRED_DIR")
    p.add_argument("--scans", metavar="GLOB", help="only scans whose SUBJECT/SCAN matches this glob")
    p.add_argument("--overwrite", action="store_true", help="redo scans that are already finished")
    p.set_defaults(run=run_predict)


def run_predict(args):
    from speckle_rec.external import predict_dataset

    dataset = open_dataset(args.data, scans=args.scans)
    summary = predict_dataset(dataset, args.function, args.out, overwrite=args.overwrite, progress=not args.quiet)
    return _report(summary, "predicted", args.out)


def _report(summary, verb, out):
    times = list(summary.done.values())
    mean_time = f", {sum(times) / len(times):.1f} s per scan" if times else ""
    print(f"{verb} {len(summary.done)} scan(s){mean_time}, skipped {len(summary.skipped)} finished, "
          f"{len(summary.failed)} failed -> {out}", file=sys.stderr)
    for key, error in summary.failed.items():
        print(f"failed: {key}: {error}", file=sys.stderr)
    return 1 if summary.failed else 0


# ----------------------------------------------------------------------------------------- demo
def register_demo(sub, common):
    p = sub.add_parser("demo", parents=[common], help="the whole job on simulated data (no download)",
                       description="Simulate a tracked calibration scan and a test scan (TUS-REC2025 rotation "
                                   "protocol), calibrate, reconstruct the test scan from its images alone, score "
                                   "it against the identity and constant-velocity predictions, and write a "
                                   "trajectory plot and a 3D volume.")
    p.add_argument("--out", default="speckle_rec_demo", metavar="DIR", help="where to write (default ./speckle_rec_demo)")
    p.add_argument("--frames", type=int, default=800, metavar="N", help="frames of the test scan (default 800)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="write the results as JSON ('-' for stdout)")
    p.set_defaults(run=run_demo)


def run_demo(args):
    from speckle_rec.demo import run_demo as demo

    log = (lambda line: print(line, file=sys.stderr)) if not args.quiet else None
    results = demo(args.out, test_frames=args.frames, seed=args.seed, progress=not args.quiet, log=log)
    print_results(results)
    out = results["demo"]["out"]
    print(f"\nwrote {out}/: test_data/, predictions/, calibration.json, plots/, volume.mha "
          f"({results['demo']['seconds']:.0f} s). Next:\n"
          f"  speckle-rec evaluate {out}/predictions/* --data {out}/test_data\n"
          f"  speckle-rec volume {out}/test_data --truth --scan {results['scans'][0]} -o truth.mha")
    if args.json:
        write_json(args.json, results)
    return 0


REGISTRY = [register_demo, register_simulate, register_info, register_calibrate, register_reconstruct,
            register_predict, register_evaluate, register_plot, register_volume]
