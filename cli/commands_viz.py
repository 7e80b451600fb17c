"""The visual subcommands, `plot` and `volume`: parsers and thin calls into the library."""

import sys

from speckle_rec.errors import DataError
from speckle_rec.io import open_dataset


# ----------------------------------------------------------------------------------------- plot
def register_plot(sub, common):
    p = sub.add_parser(
        "plot", parents=[common], help="plot predicted against true trajectories, one PNG a scan",
        description="For every scan with a prediction, write DIR/<subject>_<scan>.png: the frame outlines "
                    "and image-centre trajectory in 3D (frame-0 image mm), the centre's coordinates over "
                    "time and, for tracked scans, the per-frame global and local pixel errors in mm. Scans "
                    "without ground truth are plotted alone; scans without a prediction are reported and "
                    "skipped. Needs matplotlib.")
    p.add_argument("pred", metavar="PRED_DIR", help="prediction folder (PRED/<subject>/<scan>.h5)")
    p.add_argument("--data", required=True, metavar="DATA_DIR", help="the data folder the prediction is of")
    p.add_argument("-o", "--out", metavar="DIR", help="where the PNGs go (default PRED_DIR/plots)")
    p.add_argument("--scans", metavar="GLOB", help="only scans whose SUBJECT/SCAN matches this glob")
    p.set_defaults(run=run_plot)


def run_plot(args):
    from speckle_rec.plot import plot_predictions

    dataset = open_dataset(args.data, scans=args.scans)
    written, missing = plot_predictions(dataset, args.pred, args.out, progress=not args.quiet)
    for key in missing:
        print(f"no prediction for {key}, skipped", file=sys.stderr)
    if not written:
        raise DataError(f"no prediction for any of the {len(dataset.scans)} scan(s)", args.pred)
    folder = next(iter(written.values())).parent
    print(f"wrote {len(written)} plot(s) to {folder}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------- volume
def register_volume(sub, common):
    from speckle_rec.volume import DEFAULT_FILL_MM, DEFAULT_MAX_BYTES, DEFAULT_VOXEL_MM

    p = sub.add_parser(
        "volume", parents=[common], help="compound a scan's frames into a 3D volume",
        description="Place every frame of one scan at its pose (a prediction's global transforms, or the "
                    "tracked ground truth with --truth), average the pixels falling in each voxel, fill "
                    "small gaps inside the swept region, and write a .mha or .nrrd volume in frame-0 "
                    "image-mm coordinates (spacing and origin set, direction identity) that 3D Slicer "
                    "opens as is.")
    p.add_argument("data", metavar="DATA_DIR")
    poses = p.add_mutually_exclusive_group(required=True)
    poses.add_argument("--pred", metavar="PRED_DIR", help="prediction folder giving the poses")
    poses.add_argument("--truth", action="store_true", help="use the ground-truth (tracked) poses")
    p.add_argument("--scan", required=True, metavar="SUBJECT/SCAN", help="e.g. 050/LH_rotation")
    p.add_argument("-o", "--out", required=True, metavar="VOL.mha", help="output volume (.mha or .nrrd)")
    p.add_argument("--spacing", type=float, default=DEFAULT_VOXEL_MM, metavar="MM",
                   help=f"voxel size in mm (default {DEFAULT_VOXEL_MM:g})")
    p.add_argument("--fill-mm", type=float, default=DEFAULT_FILL_MM, metavar="MM",
                   help="fill empty voxels up to this far inside the swept region "
                        f"(default {DEFAULT_FILL_MM:g}; 0: no filling)")
    p.add_argument("--max-memory-gb", type=float, default=DEFAULT_MAX_BYTES / 1024**3, metavar="G",
                   help=f"refuse grids needing more memory (default {DEFAULT_MAX_BYTES / 1024**3:g})")
    p.set_defaults(run=run_volume)


def run_volume(args):
    from speckle_rec.volume import check_volume_path, compound_volume, scan_poses, write_volume

    check_volume_path(args.out)
    dataset = open_dataset(args.data)
    scan = dataset.scan(args.scan)
    calibration = dataset.calibration()
    poses = scan_poses(scan, calibration, pred_dir=args.pred, truth=args.truth)
    with scan.frames() as frames:
        volume, origin, voxel = compound_volume(
            frames, poses, spacing_mm=calibration.spacing_mm, voxel_mm=args.spacing,
            fill_mm=args.fill_mm, max_bytes=int(args.max_memory_gb * 1024**3), progress=not args.quiet)
    write_volume(args.out, volume, origin, voxel)
    nz, ny, nx = volume.shape
    print(f"wrote {args.out}: {nx}x{ny}x{nz} voxels of {voxel:g} mm, origin "
          f"({origin[0]:.1f}, {origin[1]:.1f}, {origin[2]:.1f}) mm, {(volume > 0).mean():.0%} non-empty",
          file=sys.stderr)
    return 0
