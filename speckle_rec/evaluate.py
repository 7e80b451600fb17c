"""Score prediction folders against a tracked data folder (the `speckle-rec evaluate` job).

Every method is read through the prediction format (:mod:`speckle_rec.prediction`). Transforms are
scored without materialising dense fields; when a prediction holds DDFs, those (the challenge's
outputs) are scored instead, chunk by chunk against the ground truth. The all-identity prediction
is always included: its errors are the mean true displacements, the 2025 normalisers.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .baselines import identity_transforms
from .ddf import PixelGrid, landmark_ddfs
from .errors import DataError
from .metrics import (
    METRICS,
    landmark_error_from_ddfs,
    landmark_error_from_transforms,
    pixel_error_from_transforms,
    pixel_errors_against_ddf,
    scores_2024,
    scores_2025,
)
from .prediction import open_prediction, prediction_path
from .progress import progress_bar
from .transforms import transforms_from_tforms

IDENTITY = "identity"
SCORE_KEYS = ("score", "global", "local", "pixel", "landmark", "score_2024")


@dataclass(frozen=True)
class ScanTruth:
    """Ground truth of one tracked scan.

    Attributes
    ----------
    key : str
        ``SUBJECT/SCAN``.
    frame_to_first, frame_to_previous : ndarray, shape (N-1, 4, 4), float64
    landmarks : ndarray, shape (K, 3), int64, or None
        None when the folder has no landmark file for the subject (landmark errors are then absent).
    grid : PixelGrid
    """

    key: str
    frame_to_first: np.ndarray
    frame_to_previous: np.ndarray
    landmarks: np.ndarray
    grid: PixelGrid

    @property
    def n_frames(self):
        return self.frame_to_first.shape[0] + 1

    @classmethod
    def load(cls, scan, calibration):
        n_frames, height, width = scan.shape()
        frame_to_first, frame_to_previous = transforms_from_tforms(
            scan.read_tforms(), calibration.image_to_tool, source=scan.tforms_path
        )
        return cls(
            key=scan.key,
            frame_to_first=frame_to_first,
            frame_to_previous=frame_to_previous,
            landmarks=scan.read_landmarks() if scan.landmarks_path is not None else None,
            grid=PixelGrid.from_calibration(calibration, height, width),
        )

    def errors_of_transforms(self, frame_to_first, frame_to_previous):
        """GPE, GLE, LPE, LLE (mm) of rigid predicted transforms (GPE, LPE only without landmarks)."""
        errors = {
            "GPE": pixel_error_from_transforms(self.frame_to_first, frame_to_first, self.grid),
            "LPE": pixel_error_from_transforms(self.frame_to_previous, frame_to_previous, self.grid),
        }
        if self.landmarks is not None:
            errors["GLE"] = landmark_error_from_transforms(
                self.frame_to_first, frame_to_first, self.landmarks, self.grid
            )
            errors["LLE"] = landmark_error_from_transforms(
                self.frame_to_previous, frame_to_previous, self.landmarks, self.grid
            )
        return {m: errors[m] for m in METRICS if m in errors}

    def identity_errors(self):
        eye = identity_transforms(self.n_frames)
        return self.errors_of_transforms(eye, eye)

    def errors_of_prediction(self, prediction):
        """Errors of an opened :class:`~speckle_rec.prediction.Prediction` (DDFs preferred)."""
        if not prediction.has_ddfs:
            return self.errors_of_transforms(prediction.global_transforms, prediction.local_transforms)
        errors = {}
        for prefix, truth, dense, sparse in (
            ("G", self.frame_to_first, prediction.GP, prediction.GL),
            ("L", self.frame_to_previous, prediction.LP, prediction.LL),
        ):
            per_frame = pixel_errors_against_ddf(truth, dense, self.grid)
            if not np.all(np.isfinite(per_frame)):
                raise DataError(f"{prefix}P contains NaN or inf", prediction.path)
            errors[f"{prefix}PE"] = float(per_frame.mean())
            errors[f"{prefix}LE"] = landmark_error_from_ddfs(landmark_ddfs(truth, self.landmarks, self.grid), sparse)
        return {m: errors[m] for m in METRICS}


def _summary(rows):
    keys = list(METRICS) + [k for k in SCORE_KEYS if rows and k in next(iter(rows.values()))]
    times = [r["wall_time_s"] for r in rows.values() if r.get("wall_time_s") is not None]
    mean = {k: float(np.mean([r[k] for r in rows.values()])) if rows else None for k in keys}
    std = {k: float(np.std([r[k] for r in rows.values()])) if rows else None for k in keys}
    if times:
        mean["wall_time_s"], std["wall_time_s"] = float(np.mean(times)), float(np.std(times))
    return mean, std


def evaluate(dataset, prediction_dirs, *, progress=True):
    """Score methods on every tracked scan of a data folder.

    Parameters
    ----------
    dataset : speckle_rec.io.Dataset
        A folder whose scans have ``tforms`` and landmarks.
    prediction_dirs : sequence of str or Path
        Prediction folders; each method is named after its folder. ``identity`` is added.
    progress : bool
        Show a progress bar on stderr.

    Returns
    -------
    dict
        ``{"data": str, "scans": [keys], "methods": {NAME: {"mean": {...}, "std": {...},
        "scans": {KEY: {"GPE": …, "GLE": …, "LPE": …, "LLE": …, "score": …, "global": …,
        "local": …, "pixel": …, "landmark": …, "score_2024": …, "wall_time_s": …}},
        "missing": [keys], "folder": str}}}``. Means and standard deviations (population, ddof=0)
        are over the scans the method has; ``score`` is the 2025 final score, ``score_2024`` the
        2024 min–max score across the compared methods.
    """
    names = {}
    for folder in prediction_dirs:
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError("prediction folder not found", folder)
        name = folder.resolve().name
        if name == IDENTITY or name in names:
            raise DataError(f"two methods would both be called '{name}'; rename a folder", folder)
        names[name] = folder
    untracked = [s.key for s in dataset.scans if not s.tracked]
    if untracked:
        raise DataError(f"no ground truth (tforms) for {len(untracked)} scan(s), e.g. {untracked[0]}", dataset.root)
    unlabelled = [s.key for s in dataset.scans if s.landmarks_path is None]
    if unlabelled:
        raise DataError(f"no landmark file for {len(unlabelled)} scan(s), e.g. {unlabelled[0]}", dataset.root)
    calibration = dataset.calibration()
    methods = {name: {"folder": str(folder), "scans": {}, "missing": []} for name, folder in names.items()}
    methods[IDENTITY] = {"folder": None, "scans": {}, "missing": []}
    for scan in progress_bar(dataset.scans, desc="evaluate", unit="scan", enabled=progress):
        truth = ScanTruth.load(scan, calibration)
        identity = truth.identity_errors()
        per_method = {IDENTITY: dict(identity)}
        for name, folder in names.items():
            path = prediction_path(folder, scan.subject, scan.name)
            if not path.is_file():
                methods[name]["missing"].append(scan.key)
                continue
            with open_prediction(
                path, n_frames=truth.n_frames, n_pixels=truth.grid.n_pixels, n_landmarks=len(truth.landmarks)
            ) as prediction:
                row = truth.errors_of_prediction(prediction)
                row["wall_time_s"] = prediction.wall_time_s
            per_method[name] = row
        scores24 = scores_2024({m: {k: r[k] for k in METRICS} for m, r in per_method.items()})
        for name, row in per_method.items():
            row.update(scores_2025(row, identity))
            row["score_2024"] = scores24[name]["score"]
            methods[name]["scans"][scan.key] = row
    for entry in methods.values():
        entry["mean"], entry["std"] = _summary(entry["scans"])
    return {"data": str(dataset.root), "scans": [s.key for s in dataset.scans], "methods": methods}
