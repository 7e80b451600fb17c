"""Challenge data folders: discovery, lazy reading and validated arrays (contract §1).

Layouts read (any image size):

- train (2024 and 2025): ``frames_transfs/<sid>/<scan>.h5`` with ``frames`` and ``tforms``;
- validation / test: ``frames/<sid>/<scan>.h5`` (``frames``), ``transfs/<sid>/<scan>.h5``
  (``tforms``, optional: test data has none) and ``dataset_keys.h5`` (keys ``sub<sid>__<scan>``,
  which fix the scan order when present);
- landmarks in ``landmarks/landmark_<sid>.h5`` (2025) or ``landmark/landmark_<sid>.h5`` (2024), one
  dataset per scan; ``calib_matrix.csv`` at the top.

Frames are read lazily: :meth:`ScanRef.frames` opens the HDF5 dataset and reads only the frames
asked for, so a ~500 MB scan is never loaded whole unless the caller wants it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .calibration import read_calibration
from .errors import DataError
from .transforms import check_rigid

KEY_PATTERN = re.compile(r"^sub(?P<subject>[^_/]+)__(?P<scan>[^/]+)$")


@contextlib.contextmanager
def open_h5(path, mode="r"):
    """Open an HDF5 file, turning a missing, truncated or non-HDF5 file into a one-line DataError."""
    path = Path(path)
    if mode == "r" and not path.is_file():
        raise DataError("file not found", path)
    try:
        handle = h5py.File(path, mode)
    except OSError as exc:
        reason = str(exc).split("(")[0].strip().rstrip(".,") or exc.__class__.__name__
        raise DataError(f"cannot open HDF5 file ({reason}); truncated or not HDF5?", path) from None
    with handle:
        yield handle


def read_json(path, what):
    """The JSON document in ``path``; a missing or unparsable file is a one-line DataError naming ``what``."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{what} not found", path) from None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {what} ({exc.__class__.__name__})", path) from None


def h5_dataset(handle, key, path):
    """``handle[key]`` as an h5py Dataset, or a DataError naming the file and the missing key."""
    if key not in handle:
        found = ", ".join(sorted(handle.keys())) or "none"
        raise DataError(f"missing dataset '{key}' (found: {found})", path)
    node = handle[key]
    if not isinstance(node, h5py.Dataset):
        raise DataError(f"'{key}' is a group, expected a dataset", path)
    return node


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    Nothing half-written is ever left under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@dataclass(frozen=True)
class ScanRef:
    """One scan of a data folder; reads nothing until asked.

    Attributes
    ----------
    subject : str
        Subject folder name, e.g. ``"050"``.
    name : str
        Scan file stem, e.g. ``"LH_rotation"``.
    frames_path : Path
        File holding the ``frames`` dataset.
    tforms_path : Path or None
        File holding ``tforms`` (None for test data without tracking).
    landmarks_path : Path or None
        ``landmark_<sid>.h5`` of the subject, if the folder has one.
    """

    subject: str
    name: str
    frames_path: Path
    tforms_path: Path | None
    landmarks_path: Path | None

    @property
    def key(self):
        """``SUBJECT/SCAN``, the name used in reports and prediction folders."""
        return f"{self.subject}/{self.name}"

    @property
    def tracked(self):
        return self.tforms_path is not None

    @contextlib.contextmanager
    def frames(self):
        """Context manager yielding the validated, lazily read ``frames`` dataset (N, H, W) uint8."""
        with open_h5(self.frames_path) as handle:
            yield checked_frames(h5_dataset(handle, "frames", self.frames_path), self.frames_path)

    def read_frames(self, start=0, stop=None):
        """Frames ``start:stop`` as a uint8 array (n, H, W)."""
        with self.frames() as frames:
            return frames[start:stop]

    def shape(self):
        """(N, H, W) of the frames, read from the file's metadata only."""
        with self.frames() as frames:
            return tuple(int(v) for v in frames.shape)

    def read_tforms(self):
        """Tool → camera poses (N, 4, 4) as float64, validated rigid and matching the frame count."""
        if self.tforms_path is None:
            raise DataError(f"scan {self.key} has no tforms (test data?)", self.frames_path)
        with open_h5(self.tforms_path) as handle:
            node = h5_dataset(handle, "tforms", self.tforms_path)
            if node.ndim != 3 or node.shape[1:] != (4, 4):
                raise DataError(f"expected tforms of shape (N, 4, 4), got {node.shape}", self.tforms_path)
            if not np.issubdtype(node.dtype, np.floating):
                raise DataError(f"expected floating-point tforms, got {node.dtype}", self.tforms_path)
            tforms = node[()]
        n_frames = self.shape()[0]
        if tforms.shape[0] != n_frames:
            raise DataError(
                f"tforms has {tforms.shape[0]} poses but {self.frames_path.name} has {n_frames} frames",
                self.tforms_path,
            )
        return check_rigid(tforms, name="tforms", source=self.tforms_path)

    def read_landmarks(self):
        """Landmarks (K, 3) int64: 0-based frame index (≥ 1), 1-based x (column), 1-based y (row).

        Validated against the scan's frame count and image size.
        """
        if self.landmarks_path is None:
            raise DataError(f"no landmark file for subject {self.subject}", self.frames_path.parent)
        with open_h5(self.landmarks_path) as handle:
            node = h5_dataset(handle, self.name, self.landmarks_path)
            values = node[()]
        return check_landmarks(values, self.shape(), source=f"{self.landmarks_path}[{self.name}]")


def checked_frames(frames, source=None):
    """Validate a frames array or dataset: shape (N, H, W) with N ≥ 2, dtype uint8."""
    if frames.ndim != 3:
        raise DataError(f"expected frames of shape (N, H, W), got {tuple(frames.shape)}", source)
    if frames.dtype != np.uint8:
        raise DataError(f"expected frames of dtype uint8, got {frames.dtype}", source)
    if frames.shape[0] < 2 or frames.shape[1] < 1 or frames.shape[2] < 1:
        raise DataError(f"expected at least 2 non-empty frames, got shape {tuple(frames.shape)}", source)
    return frames


def check_landmarks(landmarks, frames_shape, *, source=None):
    """Validate landmarks (K, 3) against a scan of shape (N, H, W) and return them as int64.

    Frame indices must lie in 1..N−1 (frame 0 has no displacement), x in 1..W and y in 1..H.
    """
    values = np.asarray(landmarks)
    if values.ndim != 2 or values.shape[1] != 3 or values.shape[0] == 0:
        raise DataError(f"expected landmarks of shape (K, 3), got {values.shape}", source)
    if np.issubdtype(values.dtype, np.floating):
        if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            raise DataError("expected integer landmarks, got non-integer values", source)
    elif not np.issubdtype(values.dtype, np.integer):
        raise DataError(f"expected integer landmarks, got {values.dtype}", source)
    values = values.astype(np.int64)
    n_frames, height, width = frames_shape
    for column, name, low, high in ((0, "frame index", 1, n_frames - 1), (1, "x", 1, width), (2, "y", 1, height)):
        bad = np.flatnonzero((values[:, column] < low) | (values[:, column] > high))
        if bad.size:
            extra = " (landmarks on frame 0 are invalid)" if column == 0 and values[bad[0], 0] == 0 else ""
            raise DataError(
                f"landmark {bad[0]} has {name} {values[bad[0], column]} outside {low}..{high}{extra}", source
            )
    return values


@dataclass(frozen=True)
class Dataset:
    """A challenge data folder.

    Attributes
    ----------
    root : Path
    layout : {"train", "test"}
        ``train``: ``frames_transfs/``; ``test``: ``frames/`` (+ ``transfs/``, ``dataset_keys.h5``).
    scans : tuple of ScanRef
        In ``dataset_keys.h5`` order when present, else sorted by subject and name.
    """

    root: Path
    layout: str
    scans: tuple

    @property
    def calibration_path(self):
        return self.root / "calib_matrix.csv"

    def calibration(self):
        """The folder's :class:`~speckle_rec.calibration.Calibration` (``calib_matrix.csv``)."""
        return read_calibration(self.calibration_path)

    def select(self, pattern):
        """The scans whose ``SUBJECT/SCAN`` key matches the glob ``pattern`` (a new Dataset)."""
        from fnmatch import fnmatchcase

        chosen = tuple(s for s in self.scans if fnmatchcase(s.key, pattern))
        if not chosen:
            raise DataError(f"no scan matches '{pattern}'", self.root)
        return Dataset(self.root, self.layout, chosen)

    def scan(self, key):
        """The scan called ``SUBJECT/SCAN``."""
        for scan in self.scans:
            if scan.key == key:
                return scan
        raise DataError(f"no scan '{key}' (have: {', '.join(s.key for s in self.scans[:6])}...)", self.root)


def _landmark_file(root, subject):
    for folder in ("landmarks", "landmark"):
        candidate = root / folder / f"landmark_{subject}.h5"
        if candidate.is_file():
            return candidate
    return None


def _keys_order(keys_path):
    with open_h5(keys_path) as handle:
        keys = list(handle.keys())
    pairs = []
    for key in keys:
        match = KEY_PATTERN.match(key)
        if not match:
            raise DataError(f"key '{key}' is not of the form sub<subject>__<scan>", keys_path)
        pairs.append((match["subject"], match["scan"]))
    return pairs


def open_dataset(root, *, scans=None):
    """Discover the scans of a challenge data folder (train or validation/test layout).

    Parameters
    ----------
    root : str or Path
    scans : str, optional
        Keep only the scans whose ``SUBJECT/SCAN`` key matches this glob (see :meth:`Dataset.select`).

    Returns
    -------
    Dataset

    Raises
    ------
    DataError
        If the folder does not exist, holds no scans, or ``dataset_keys.h5`` names a missing scan.
    """
    root, pattern = Path(root), scans
    if not root.is_dir():
        raise DataError("data folder not found", root)
    if (root / "frames_transfs").is_dir():
        layout, frames_dir, tforms_dir = "train", root / "frames_transfs", root / "frames_transfs"
    elif (root / "frames").is_dir():
        layout, frames_dir, tforms_dir = "test", root / "frames", root / "transfs"
    else:
        raise DataError(
            "no scans found (expected frames_transfs/<subject>/<scan>.h5 or frames/<subject>/<scan>.h5)", root
        )
    keys_path = root / "dataset_keys.h5"
    if layout == "test" and keys_path.is_file():
        pairs = _keys_order(keys_path)
        for subject, name in pairs:
            if not (frames_dir / subject / f"{name}.h5").is_file():
                raise DataError(f"listed in dataset_keys.h5 but missing: frames/{subject}/{name}.h5", root)
    else:
        pairs = sorted(
            (p.parent.name, p.stem) for p in frames_dir.glob("*/*.h5") if not p.name.startswith(".")
        )
    if not pairs:
        raise DataError(f"no scans found in {frames_dir.name}/", root)
    refs = []
    for subject, name in pairs:
        tforms_path = tforms_dir / subject / f"{name}.h5"
        refs.append(
            ScanRef(
                subject=subject,
                name=name,
                frames_path=frames_dir / subject / f"{name}.h5",
                tforms_path=tforms_path if tforms_path.is_file() else None,
                landmarks_path=_landmark_file(root, subject),
            )
        )
    dataset = Dataset(root=root, layout=layout, scans=tuple(refs))
    return dataset if pattern is None else dataset.select(pattern)


# --------------------------------------------------------------------------------------- writing
@dataclass(frozen=True)
class ScanData:
    """One scan to write: ``frames`` is a uint8 (N, H, W) array or any object with that ``shape``
    whose slices ``frames[a:b]`` give uint8 chunks (e.g. a lazy renderer); ``tforms`` (N, 4, 4)
    tool → camera or None; ``landmarks`` (K, 3) int or None."""

    subject: str
    name: str
    frames: object
    tforms: np.ndarray | None = None
    landmarks: np.ndarray | None = None


def _write_frames(handle, frames, chunk_frames, on_chunk=None):
    n, height, width = frames.shape
    node = handle.create_dataset("frames", shape=(n, height, width), dtype=np.uint8, chunks=(1, height, width))
    for start in range(0, n, chunk_frames):
        stop = min(start + chunk_frames, n)
        chunk = np.asarray(frames[start:stop])
        if chunk.dtype != np.uint8 or chunk.shape != (stop - start, height, width):
            raise DataError(f"frame chunk {start}:{stop} is {chunk.dtype} {chunk.shape}, expected uint8")
        node[start:stop] = chunk
        if on_chunk is not None:
            on_chunk(stop - start)


def write_dataset(root, scans, *, layout="train", calibration=None, landmark_folder="landmarks",
                  chunk_frames=64, on_chunk=None):
    """Write scans into a challenge data folder; every file is written atomically.

    Parameters
    ----------
    root : str or Path
    scans : iterable of ScanData
    layout : {"train", "test"}
        ``train``: ``frames_transfs/<sid>/<scan>.h5`` (frames + tforms). ``test``:
        ``frames/<sid>/<scan>.h5``, ``transfs/<sid>/<scan>.h5`` and ``dataset_keys.h5``.
    calibration : Calibration, optional
        Written as ``calib_matrix.csv`` (default: the challenge's values).
    landmark_folder : {"landmarks", "landmark"}
        2025 and 2024 folder names.
    chunk_frames : int
        Frames requested from ``scan.frames`` at a time.
    on_chunk : callable, optional
        Called with the number of frames after each chunk is written (progress bars).
    """
    from .calibration import Calibration, write_calibration

    if layout not in ("train", "test"):
        raise DataError(f"unknown layout '{layout}' (expected train or test)")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    calibration = Calibration.default() if calibration is None else calibration
    landmarks_by_subject = {}
    keys = []
    for scan in scans:
        name = f"{scan.name}.h5"
        tforms = None if scan.tforms is None else np.asarray(scan.tforms, dtype=np.float32)
        if layout == "train":
            if tforms is None:
                raise DataError(f"scan {scan.subject}/{scan.name}: the train layout needs tforms")
            with atomic_path(root / "frames_transfs" / scan.subject / name) as tmp, h5py.File(tmp, "w") as f:
                _write_frames(f, scan.frames, chunk_frames, on_chunk)
                f.create_dataset("tforms", data=tforms)
        else:
            with atomic_path(root / "frames" / scan.subject / name) as tmp, h5py.File(tmp, "w") as f:
                _write_frames(f, scan.frames, chunk_frames, on_chunk)
            if tforms is not None:
                with atomic_path(root / "transfs" / scan.subject / name) as tmp, h5py.File(tmp, "w") as f:
                    f.create_dataset("tforms", data=tforms)
            keys.append(f"sub{scan.subject}__{scan.name}")
        if scan.landmarks is not None:
            landmarks_by_subject.setdefault(scan.subject, {})[scan.name] = np.asarray(scan.landmarks, np.int64)
    for subject, by_scan in landmarks_by_subject.items():
        with atomic_path(root / landmark_folder / f"landmark_{subject}.h5") as tmp, h5py.File(tmp, "w") as f:
            for scan_name, values in by_scan.items():
                f.create_dataset(scan_name, data=values)
    if keys:
        with atomic_path(root / "dataset_keys.h5") as tmp, h5py.File(tmp, "w") as f:
            for key in keys:
                f.create_dataset(key, data=np.int64(0))
    with atomic_path(root / "calib_matrix.csv") as tmp:
        write_calibration(tmp, calibration)
    return root
