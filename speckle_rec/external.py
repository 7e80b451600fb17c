"""Run any challenge-style ``predict_ddfs`` over a data folder and save its outputs.

This is how a learned model's submission (or ours, ``speckle_rec:predict_ddfs``) is compared with
speckle_rec through the prediction format: the function is timed per scan like the challenge's
``test.py`` does (the call only), its four outputs are checked against the contract shapes and
saved with the wall time, and ``speckle-rec evaluate`` scores the folder.
"""

import importlib
import importlib.util
import inspect
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .batch import run_scans
from .errors import DataError
from .prediction import DDF_KEYS, write_prediction


def load_function(spec):
    """Import ``MODULE:CALLABLE``; MODULE is a dotted module name or a path to a ``.py`` file.

    A file's folder is put on ``sys.path`` first, so a submission's own imports (``utils/...``) work.
    """
    module_name, sep, attr = str(spec).rpartition(":")
    if not sep or not module_name or not attr:
        raise DataError(f"expected MODULE:CALLABLE (e.g. submission/predict_ddfs.py:predict_ddfs), got '{spec}'")
    try:
        if module_name.endswith(".py") or Path(module_name).is_file():
            path = Path(module_name).resolve()
            if not path.is_file():
                raise DataError("module file not found", path)
            sys.path.insert(0, str(path.parent))
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - report a broken submission in one line
        raise DataError(f"cannot import {module_name}: {exc.__class__.__name__}: {exc}") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise DataError(f"{module_name} has no callable '{attr}'")
    return function


def _cpu_device():
    try:
        import torch
    except ImportError:
        return "cpu"
    return torch.device("cpu")


def _checked_outputs(outputs, n_frames, n_pixels, n_landmarks, where):
    if not isinstance(outputs, (tuple, list)) or len(outputs) != 4:
        raise DataError(f"{where}: expected a tuple (GP, GL, LP, LL), got {type(outputs).__name__}")
    expected = {"GP": (n_frames - 1, 3, n_pixels), "GL": (3, n_landmarks),
                "LP": (n_frames - 1, 3, n_pixels), "LL": (3, n_landmarks)}
    checked = {}
    for (key, shape), value in zip(expected.items(), outputs):
        if not isinstance(value, np.ndarray):
            raise DataError(f"{where}: {key} must be a numpy array, got {type(value).__name__}")
        if value.shape != shape:
            raise DataError(f"{where}: expected {key} of shape {shape}, got {value.shape}")
        checked[key] = value
    return checked


@dataclass(frozen=True)
class PredictTask:
    """Call a challenge ``predict_ddfs`` on one scan and save its outputs with the call's wall time."""

    function: object
    calibration_path: Path

    def __call__(self, scan, out_path):
        frames = scan.read_frames()
        landmarks = scan.read_landmarks()
        takes_device = len(inspect.signature(self.function).parameters) >= 4  # 2025 signature; 2024 had 3
        args = (frames, landmarks, str(self.calibration_path)) + ((_cpu_device(),) if takes_device else ())
        start = time.perf_counter()
        outputs = self.function(*args)
        wall = time.perf_counter() - start
        ddfs = _checked_outputs(outputs, frames.shape[0], frames.shape[1] * frames.shape[2], len(landmarks),
                                f"{getattr(self.function, '__name__', 'function')} on {scan.key}")
        write_prediction(out_path, wall_time_s=wall, **ddfs)
        return wall


def predict_dataset(dataset, function, out_dir, *, overwrite=False, progress=True):
    """Run ``function(frames, landmark, data_path_calib[, device])`` on every scan of ``dataset``.

    Parameters
    ----------
    dataset : speckle_rec.io.Dataset
        Needs landmarks for every scan (the function takes them).
    function : callable or str
        The callable, or ``MODULE:CALLABLE`` for :func:`load_function`.
    out_dir : str or Path
        Prediction folder (GP, GL, LP, LL and ``wall_time_s`` per scan).
    overwrite : bool
    progress : bool

    Returns
    -------
    speckle_rec.batch.BatchSummary
    """
    if isinstance(function, str):
        function = load_function(function)
    missing = [s.key for s in dataset.scans if s.landmarks_path is None]
    if missing:
        raise DataError(f"predict_ddfs needs landmarks; none for {missing[0]}", dataset.root)
    if not dataset.calibration_path.is_file():
        raise DataError("calibration file not found", dataset.calibration_path)
    return run_scans(dataset, out_dir, PredictTask(function, dataset.calibration_path), finished_keys=DDF_KEYS,
                     overwrite=overwrite, progress=progress, desc="predict")
