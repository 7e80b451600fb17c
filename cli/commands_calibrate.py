"""`speckle-rec calibrate`: fit the decorrelation curves from tracked scans (logic in speckle_rec.calibrate)."""

import sys

from speckle_rec.errors import DataError
from speckle_rec.io import open_dataset

from .output import format_table


def _bands(text):
    """``--bands``: a count ("8") or comma-separated edges in mm ("0,15,25,40")."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise DataError(f"expected --bands as a count or comma-separated edges in mm, got '{text}'") from None
    if len(values) == 1:
        if values[0] != int(values[0]) or values[0] < 1:
            raise DataError(f"expected a positive whole number of --bands, got '{text}'")
        return int(values[0])
    return values


def register_calibrate(sub, common):
    p = sub.add_parser("calibrate", parents=[common], help="fit the decorrelation curves from tracked scans",
                       description="Sample frame pairs of the tracked scans at several strides, measure their patch "
                                   "correlations as the estimator does (in-plane compensation first), take each "
                                   "patch's true elevational distance, in-plane rotation and tilt from the tracker, "
                                   "and fit the decorrelation curves per depth band. Writes the model (use it with "
                                   "'reconstruct --calibration') with the fit report; prints the fit quality per "
                                   "band on stderr.")
    p.add_argument("data", metavar="DATA_DIR", help="tracked data folder (train layout, or test layout with transfs/)")
    p.add_argument("-o", "--out", required=True, metavar="CALIB.json", help="model file to write")
    p.add_argument("--scans", metavar="GLOB", help="only scans whose SUBJECT/SCAN matches this glob")
    p.add_argument("--pairs-per-scan", type=int, default=300, metavar="N",
                   help="frame pairs sampled per scan (default 300)")
    p.add_argument("--bands", type=str, default=None, metavar="B",
                   help="depth bands: a count, or comma-separated edges in image mm (default: ~10 mm bands, at most 8)")
    p.add_argument("--max-distance", type=float, default=3.0, metavar="MM",
                   help="largest true elevational distance of a sampled pair (default 3 mm)")
    p.add_argument("--holdout", type=float, default=0.2, metavar="F",
                   help="fraction of pairs held out to measure the held-out residual (default 0.2; 0: none)")
    p.add_argument("--description", default="", metavar="TEXT", help="prepended to the model's description")
    p.add_argument("--seed", type=int, default=0, help="seeds the pair sampling and the hold-out split (default 0)")
    p.set_defaults(run=run_calibrate)


def _number(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def print_report(report, file=None):
    """The per-band fit table of a :func:`speckle_rec.calibrate.calibrate_model` report (default on stderr)."""
    file = sys.stderr if file is None else file
    rows = []
    for band in report["bands"]:
        lo, hi = band["depth_mm"]
        rows.append([f"{lo:.1f}-{hi:.1f}", band["samples"], _number(band["sigma_mm"]), _number(band["floor"]),
                     _number(band["shape"], 2), _number(band["peak"]), _number(band["rotation_sigma_deg"], 2),
                     _number(band["tilt_sigma_deg"], 2), _number(band["residual_mm"]),
                     _number(band["holdout_residual_mm"])])
    flow = report["inplane_error_mm"]
    print(f"{len(report['scans'])} scan(s), {report['pairs']} pairs ({report['flow_failures']} without in-plane "
          f"motion), {report['samples']} patch samples; flow vs tracker at the fan centre: median "
          f"{_number(flow['median'])} mm, 95% {_number(flow['p95'])} mm", file=file)
    print(format_table(["depth mm", "samples", "sigma mm", "floor", "shape", "peak", "rot sd deg", "tilt sd deg",
                        "residual mm", "held-out mm"], rows), file=file)


def print_prior(prior, file=None):
    """The first out-of-plane direction per scan name (default on stderr)."""
    file = sys.stderr if file is None else file
    rows = []
    for name, (plus, minus) in sorted(prior.counts.items()):
        direction, basis = prior.choose(name)
        rows.append([name, plus, minus, f"{direction:+d}", basis])
    print("first out-of-plane direction of the tracked scans (used by 'reconstruct --calibration'):", file=file)
    print(format_table(["scan name", "+1 first", "-1 first", "used", "decided by"], rows), file=file)


def run_calibrate(args):
    from speckle_rec.calibrate import calibrate_model, learn_direction_prior, save_calibration

    dataset = open_dataset(args.data, scans=args.scans)
    if args.pairs_per_scan < 1:
        raise DataError(f"expected --pairs-per-scan >= 1, got {args.pairs_per_scan}")
    bands = None if args.bands is None else _bands(args.bands)
    model, report = calibrate_model(dataset, pairs_per_scan=args.pairs_per_scan, bands=bands,
                                    max_distance_mm=args.max_distance, holdout=args.holdout,
                                    description=args.description, seed=args.seed, threads=args.threads,
                                    progress=not args.quiet)
    prior = learn_direction_prior(dataset)
    for key in report["skipped_untracked"]:
        print(f"warning: skipped {key}: no tforms", file=sys.stderr)
    print_report(report)
    print_prior(prior)
    save_calibration(args.out, model, report=report, prior=prior)
    print(f"wrote {args.out} ({report['seconds']:.0f} s)", file=sys.stderr)
    return 0
