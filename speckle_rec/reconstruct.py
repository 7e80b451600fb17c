"""Whole-scan reconstruction: frames → transforms → prediction files or challenge DDFs.

- :func:`reconstruct_scan` estimates ``frame_to_first`` and ``frame_to_previous`` of one scan (with
  the trajectory's diagnostics);
- :func:`predict_ddfs` is the drop-in body of the challenge's submission function (CPU, no torch);
- :func:`reconstruct_dataset` runs every scan of a data folder into a prediction folder: atomic
  writes, finished scans skipped on a rerun, a failing scan reported without stopping the others,
  optional worker processes, each scan's wall time stored in its file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .calibration import read_calibration
from .ddf import PixelGrid, PrefaultedOutputs, ddfs_from_transforms
from .decorrelation import DecorrelationModel
from .direction import DirectionPrior
from .batch import ALL_KEYS, TRANSFORM_KEYS, run_scans
from .errors import DataError
from .io import check_landmarks, checked_frames
from .prediction import write_prediction


def reconstruct_scan(frames, *, spacing_mm, model=None, first_direction=1, slide=True, level_sweeps=True,
                     threads=None):
    """Estimate the trajectory of one scan from its frames alone.

    Parameters
    ----------
    frames : array_like of uint8, shape (N, H, W)
    spacing_mm : (float, float)
        (sx, sy) mm per pixel along columns and rows.
    model : DecorrelationModel, optional
        Decorrelation curves (default: the packaged model of the simulator's default probe).
    first_direction : {1, -1}
        Sign of the first out-of-plane move (the global mirror speckle cannot decide, see
        :mod:`speckle_rec.direction`); :meth:`DirectionPrior.choose` gives it from tracked scans.
    slide : bool
        Decide the sign across quiet stretches by the anatomy slide (:mod:`speckle_rec.slide`), on
        scans that fan about a fixed skin contact (default True; ``benchmarks/README.md`` gives what
        it does to the scores and the time).
    level_sweeps : bool
        On scans without a fixed skin contact (sweeps), fit the depth gradient of the curves' σ so
        that the sweep ends at the tilt about image x it started with (default True; see
        :func:`speckle_rec.trajectory.estimate_trajectory`, option ``level_sweeps``).
    threads : int, optional
        Numba / OpenCV threads.

    Returns
    -------
    speckle_rec.trajectory.TrajectoryResult
        ``frame_to_first`` and ``frame_to_previous`` (N-1, 4, 4) float64: image-mm transforms frame
        i → 0 and frame i → i−1 (row i−1), consistent by construction; and ``diagnostics``.
    """
    from .trajectory import estimate_trajectory

    frames = checked_frames(np.asarray(frames), "frames")
    model = DecorrelationModel.default() if model is None else model
    return estimate_trajectory(frames, spacing_mm=spacing_mm, model=model, threads=threads,
                               first_direction=first_direction, slide=slide, level_sweeps=level_sweeps)


def predict_ddfs(frames, landmark, data_path_calib, device=None, *, calibration=None, slide=True,
                 level_sweeps=True):
    """The challenge's submission function: (GP, GL, LP, LL) for one scan, on the CPU.

    Parameters
    ----------
    frames : ndarray of uint8, shape (N, H, W)
        The whole scan (480 x 640 in the challenge; any size works).
    landmark : ndarray of int, shape (K, 3)
        (frame index ≥ 1, x, y) with 1-based x (column) and y (row).
    data_path_calib : str or Path
        The folder's ``calib_matrix.csv``.
    device : object, optional
        Ignored (accepted for the 2025 signature; speckle_rec runs on the CPU).
    calibration : str or Path, optional
        A calibration file from ``speckle-rec calibrate`` (keyword only, so the challenge's
        positional call is unchanged): its decorrelation curves replace the packaged ones, which
        match the simulator's default probe, not a real one. Its first-direction prior is not used:
        the challenge does not pass the scan's name, so the +1 convention stays.
    slide : bool
        The anatomy-slide sign stage (:func:`reconstruct_scan`; keyword only, default True). It
        acts on scans that fan about a fixed skin contact and adds 3-4 s at 1600 × 480 × 640.
    level_sweeps : bool
        Level sweeps (:func:`reconstruct_scan`; keyword only, default True).

    Returns
    -------
    GP : ndarray, float32, shape (N-1, 3, H·W)
    GL : ndarray, float32, shape (3, K)
    LP : ndarray, float32, shape (N-1, 3, H·W)
    LL : ndarray, float32, shape (3, K)
    """
    del device
    frames = checked_frames(np.asarray(frames), "frames")
    landmark = check_landmarks(landmark, frames.shape, source="landmark")
    calib = read_calibration(data_path_calib)
    model = None if calibration is None else DecorrelationModel.from_json(calibration)
    n, height, width = frames.shape
    grid = PixelGrid.from_calibration(calib, height, width)
    # GP and LP are 2 x 5.9 GB at 1600 x 480 x 640: their page faults overlap the estimation
    outputs = PrefaultedOutputs([(n - 1, 3, height * width)] * 2)
    try:
        result = reconstruct_scan(frames, spacing_mm=calib.spacing_mm, model=model, slide=slide,
                                  level_sweeps=level_sweeps)
    except BaseException:
        outputs.cancel()
        raise
    return ddfs_from_transforms(result.frame_to_first, result.frame_to_previous, landmark, grid,
                                out=outputs.arrays())


@dataclass(frozen=True)
class ReconstructTask:
    """Reconstruct one scan into a prediction file (picklable, for worker processes)."""

    calibration: object
    model: DecorrelationModel
    ddf: bool
    direction_prior: DirectionPrior | None = None
    slide: bool = True
    level_sweeps: bool = True
    threads: int | None = None

    def __call__(self, scan, out_path):
        start = time.perf_counter()
        frames = scan.read_frames()
        direction, basis = (self.direction_prior or DirectionPrior()).choose(scan.name)
        result = reconstruct_scan(frames, spacing_mm=self.calibration.spacing_mm, model=self.model,
                                  first_direction=direction, slide=self.slide, level_sweeps=self.level_sweeps,
                                  threads=self.threads)
        wall = time.perf_counter() - start
        diagnostics = {k: v for k, v in result.diagnostics.items() if k not in ("key_frames", "key_signs")}
        diagnostics["signs"]["first_direction_basis"] = basis
        extra = {}
        if self.ddf:
            extra = dict(
                ddf_grid=PixelGrid.from_calibration(self.calibration, frames.shape[1], frames.shape[2]),
                landmarks=scan.read_landmarks(),
            )
        write_prediction(out_path, global_transforms=result.frame_to_first,
                         local_transforms=result.frame_to_previous, wall_time_s=wall, diagnostics=diagnostics, **extra)
        return wall


def reconstruct_dataset(dataset, out_dir, *, model=None, direction_prior=None, ddf=False, slide=True,
                        level_sweeps=True, jobs=1, threads=None, overwrite=False, progress=True):
    """Reconstruct every scan of ``dataset`` into the prediction folder ``out_dir``.

    Parameters
    ----------
    dataset : speckle_rec.io.Dataset
        Train or test layout; ``tforms`` are not read.
    out_dir : str or Path
        Written as ``out_dir/<subject>/<scan>.h5`` (see :mod:`speckle_rec.prediction`), each file with
        its scan's wall time (attribute ``wall_time_s``, DDF writing excluded).
    model : DecorrelationModel, optional
    direction_prior : DirectionPrior, optional
        First out-of-plane direction per scan name, learnt from tracked scans
        (:func:`speckle_rec.calibrate.learn_direction_prior`); default: the +1 convention.
    ddf : bool
        Also write GP, GL, LP, LL (in chunks; needs the folder's landmarks).
    slide : bool
        The anatomy-slide sign stage (:func:`reconstruct_scan`; default True).
    level_sweeps : bool
        Level sweeps (:func:`reconstruct_scan`; default True).
    jobs : int
        Scans reconstructed at once, each in its own process.
    threads : int, optional
        Threads per job (default: the cores divided among the jobs).
    overwrite : bool
        Recompute scans whose prediction file is already complete (default: skip them).
    progress : bool

    Returns
    -------
    speckle_rec.batch.BatchSummary
    """
    calibration = dataset.calibration()
    model = DecorrelationModel.default() if model is None else model
    if ddf:
        missing = [s.key for s in dataset.scans if s.landmarks_path is None]
        if missing:
            raise DataError(f"--ddf needs landmarks; none for {missing[0]}", dataset.root)
    task = ReconstructTask(calibration, model, ddf, direction_prior, slide, level_sweeps)
    return run_scans(dataset, out_dir, task, finished_keys=ALL_KEYS if ddf else TRANSFORM_KEYS, jobs=jobs,
                     threads=threads, overwrite=overwrite, progress=progress, desc="reconstruct")
