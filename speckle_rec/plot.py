"""Figures of predicted trajectories against ground truth (the `speckle-rec plot` job).

One PNG per scan: (a) the image outline of every k-th frame and the trajectory of the image centre
in 3D, in frame-0 image-mm coordinates, predicted and true; (b) the centre's x, y, z over time;
(c) the per-frame global and local pixel errors (mm) when the scan has ground truth. Predictions
holding only DDFs are drawn from the DDF values at the image corners.

matplotlib is optional (``pip install 'speckle_rec[plot]'``); it is imported when a figure is made,
and figures are drawn on the Agg canvas without touching pyplot's global state.
"""

from pathlib import Path

import numpy as np

from .ddf import PixelGrid
from .errors import DataError
from .evaluate import ScanTruth
from .io import atomic_path
from .metrics import pixel_errors_against_ddf, pixel_errors_from_transforms
from .prediction import prediction_path
from .progress import progress_bar
from .volume import corner_pixels, corner_points_mm, ddf_at_pixels, open_scan_prediction

OUTLINES = 24  # frame outlines drawn per scan
TRUE_COLOR, PRED_COLOR = "tab:blue", "tab:orange"
GLOBAL_COLOR, LOCAL_COLOR = "black", "tab:gray"
AXIS_COLORS = ("tab:red", "tab:green", "tab:purple")


def _matplotlib():
    """The Agg figure and canvas classes, or a DataError saying how to install matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from mpl_toolkits.mplot3d.art3d import Line3DCollection
    except ImportError:
        raise DataError("matplotlib is needed for plots: pip install 'speckle_rec[plot]'") from None
    return Figure, FigureCanvasAgg, Line3DCollection


class _PixelTap:
    """A dense DDF as an array-like that keeps its values at a few pixels for every row read through it.

    Passed to the error metric, it lets one pass over a large on-disk ``GP`` give both the errors
    and the corner positions.
    """

    def __init__(self, dense, pixels):
        self.dense, self.pixels = dense, pixels
        self.shape = tuple(dense.shape)
        self.values = np.full((self.shape[0], 3, len(pixels)), np.nan)

    def __getitem__(self, index):
        chunk = np.asarray(self.dense[index])
        self.values[index] = chunk[:, :, self.pixels]
        return chunk

    def pixel_values(self):
        """(n, 3, k) values at the pixels; rows not yet read through the tap are read now."""
        missing = np.isnan(self.values[:, 0, 0])
        if missing.any():
            self.values[missing] = ddf_at_pixels(self.dense, self.pixels)[missing]
        return self.values


def _corner_track(frame_to_first, grid):
    """Corner positions (N, 4, 3) in frame-0 image-mm of every frame, frame 0 included."""
    corners = corner_points_mm(grid)
    poses = np.concatenate([np.eye(4)[None], frame_to_first])
    return np.einsum("nij,kj->nki", poses[:, :3, :3], corners) + poses[:, None, :3, 3]


def scan_tracks(truth, prediction, *, grid):
    """Corner tracks and per-frame errors of one scan's prediction.

    Parameters
    ----------
    truth : ScanTruth or None
    prediction : speckle_rec.prediction.Prediction
        Transforms are used when present (DDFs written from them are equivalent), else ``GP``/``LP``.
    grid : PixelGrid

    Returns
    -------
    dict
        ``pred_corners`` (N, 4, 3) mm; with ``truth`` also ``true_corners`` (N, 4, 3) mm and
        ``global_error``, ``local_error`` (N-1,) mm per frame (frames 1..N−1).
    """
    out = {}
    if truth is not None:
        out["true_corners"] = _corner_track(truth.frame_to_first, grid)
    if prediction.has_transforms:
        out["pred_corners"] = _corner_track(prediction.global_transforms, grid)
        if truth is not None:
            out["global_error"] = pixel_errors_from_transforms(
                truth.frame_to_first, prediction.global_transforms, grid)
            out["local_error"] = pixel_errors_from_transforms(
                truth.frame_to_previous, prediction.local_transforms, grid)
        return out
    tap = _PixelTap(prediction.GP, corner_pixels(grid))
    if truth is not None:
        out["global_error"] = pixel_errors_against_ddf(truth.frame_to_first, tap, grid)
        out["local_error"] = pixel_errors_against_ddf(truth.frame_to_previous, prediction.LP, grid)
    corners = corner_points_mm(grid)
    moved = corners[None] + np.swapaxes(tap.pixel_values(), 1, 2)
    out["pred_corners"] = np.concatenate([corners[None], moved])
    if not all(np.all(np.isfinite(values)) for values in out.values()):
        raise DataError("GP or LP contains NaN or inf", prediction.path)
    return out


def _outlines(corners, frames):
    return [np.vstack([c, c[:1]])[:, [0, 2, 1]] for c in corners[frames]]


def _draw_3d(ax, tracks, line_collection):
    n = tracks["pred_corners"].shape[0]
    frames = np.unique(np.linspace(0, n - 1, min(OUTLINES, n)).round().astype(int))
    points = []
    series = (("true_corners", TRUE_COLOR, "true"), ("pred_corners", PRED_COLOR, "predicted"))
    for key, color, label in series:
        if key not in tracks:
            continue
        corners = tracks[key]
        centre = corners.mean(axis=1)
        # Drawn as (x, z, y) with y (depth) pointing down, so the image plane stands upright.
        ax.add_collection3d(line_collection(_outlines(corners, frames[1:]), colors=color, linewidths=0.6,
                                            alpha=0.6))
        ax.plot(centre[:, 0], centre[:, 2], centre[:, 1], color=color, linewidth=1.6, label=f"{label} centre")
        points.append(corners.reshape(-1, 3))
    ax.add_collection3d(line_collection(_outlines(tracks["pred_corners"], [0]), colors="black",
                                        linewidths=1.2, label="frame 0"))
    points = np.concatenate(points)
    low, high = points.min(axis=0), points.max(axis=0)
    pad = 0.05 * max(float((high - low).max()), 1.0)
    low, high = low - pad, high + pad
    ax.set_xlim(low[0], high[0])
    ax.set_ylim(low[2], high[2])
    ax.set_zlim(high[1], low[1])
    ax.set_box_aspect((high - low)[[0, 2, 1]])
    ax.set_xlabel("x lateral (mm)")
    ax.set_ylabel("z elevation (mm)")
    ax.set_zlabel("y depth (mm)")
    ax.legend(loc="upper left", fontsize="small")


def _draw_centre(ax, tracks):
    for key, style, label in (("true_corners", "-", "true"), ("pred_corners", "--", "predicted")):
        if key not in tracks:
            continue
        centre = tracks[key].mean(axis=1)
        for axis, color in enumerate(AXIS_COLORS):
            ax.plot(centre[:, axis], style, color=color, linewidth=1.0, label=f"{'xyz'[axis]} {label}")
    ax.set_xlabel("frame")
    ax.set_ylabel("image centre in frame 0 (mm)")
    ax.legend(fontsize="small", ncol=2)
    ax.grid(alpha=0.3)


def _draw_errors(ax, tracks):
    frames = np.arange(1, tracks["global_error"].size + 1)
    ax.plot(frames, tracks["global_error"], color=GLOBAL_COLOR, label="global (frame → 0)")
    ax.set_xlabel("frame")
    ax.set_ylabel("global pixel error (mm)", color=GLOBAL_COLOR)
    ax.grid(alpha=0.3)
    local = ax.twinx()
    local.plot(frames, tracks["local_error"], color=LOCAL_COLOR, linewidth=0.8,
               label="local (frame → previous)")
    local.set_ylabel("local pixel error (mm)", color=LOCAL_COLOR)
    # The noisy local curve goes behind the global one.
    ax.set_zorder(local.get_zorder() + 1)
    ax.patch.set_visible(False)
    lines = ax.get_lines() + local.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize="small", loc="upper left")


def plot_scan(truth, prediction, path, *, grid=None, title=None, dpi=110):
    """Write one scan's trajectory figure as a PNG.

    Parameters
    ----------
    truth : ScanTruth or None
        Ground truth; None plots the prediction alone (test data without tforms).
    prediction : speckle_rec.prediction.Prediction
        An opened prediction (transforms and/or DDFs).
    path : str or Path
        PNG to write (atomically; folders are created).
    grid : PixelGrid, optional
        The scan's pixel grid; default ``truth.grid`` (needed when ``truth`` is None).
    title : str, optional
        Figure title (default: the file name); mean errors are appended when there is ground truth.
    dpi : int

    Returns
    -------
    dict
        :func:`scan_tracks`' arrays, for callers who want the numbers behind the figure.
    """
    figure_cls, canvas_cls, line_collection = _matplotlib()
    if grid is None:
        if truth is None:
            raise DataError("plot_scan needs the pixel grid when there is no ground truth")
        grid = truth.grid
    path = Path(path)
    tracks = scan_tracks(truth, prediction, grid=grid)
    panels = 3 if truth is not None else 2
    figure = figure_cls(figsize=(5.5 * panels, 5.0))
    canvas_cls(figure)
    _draw_3d(figure.add_subplot(1, panels, 1, projection="3d"), tracks, line_collection)
    _draw_centre(figure.add_subplot(1, panels, 2), tracks)
    heading = title or path.stem
    if truth is not None:
        _draw_errors(figure.add_subplot(1, panels, 3), tracks)
        heading += (f"   mean global error {tracks['global_error'].mean():.2f} mm, "
                    f"local {tracks['local_error'].mean():.3f} mm")
    else:
        heading += "   (no ground truth)"
    figure.suptitle(heading)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)
    return tracks


def plot_predictions(dataset, pred_dir, out_dir=None, *, progress=True):
    """Plot every scan of a data folder that has a prediction.

    Parameters
    ----------
    dataset : speckle_rec.io.Dataset
        Tracked scans are plotted against their ground truth, untracked ones alone.
    pred_dir : str or Path
        Prediction folder ``PRED/<subject>/<scan>.h5``.
    out_dir : str or Path, optional
        Where the PNGs go, as ``<subject>_<scan>.png`` (default ``pred_dir/plots``).
    progress : bool
        Show a progress bar on stderr.

    Returns
    -------
    written : dict
        ``{SUBJECT/SCAN: Path}`` of the PNGs written.
    missing : list of str
        Scans without a prediction file (skipped).
    """
    _matplotlib()  # fail before any work when matplotlib is missing
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise DataError("prediction folder not found", pred_dir)
    out_dir = pred_dir / "plots" if out_dir is None else Path(out_dir)
    calibration = dataset.calibration()
    written, missing = {}, []
    for scan in progress_bar(dataset.scans, desc="plot", unit="scan", enabled=progress):
        if not prediction_path(pred_dir, scan.subject, scan.name).is_file():
            missing.append(scan.key)
            continue
        _, height, width = scan.shape()
        grid = PixelGrid.from_calibration(calibration, height, width)
        truth = ScanTruth.load(scan, calibration) if scan.tracked else None
        path = out_dir / f"{scan.subject}_{scan.name}.png"
        with open_scan_prediction(pred_dir, scan, grid) as prediction:
            plot_scan(truth, prediction, path, grid=grid, title=scan.key)
        written[scan.key] = path
    return written, missing
