"""The prediction folder format: ``PRED/<subject>/<scan>.h5``, one file per scan.

Datasets (any subset, at least the transforms or the four DDFs):

- ``global_transforms``, ``local_transforms``: float64 (N−1, 4, 4) image-mm, frame i → 0 and
  frame i → i−1 (row i−1 is frame i);
- ``GP``, ``LP``: float32 (N−1, 3, H·W); ``GL``, ``LL``: float32 (3, K), the challenge's DDFs.

Attribute ``wall_time_s``: seconds the method took for the scan, when known; ``diagnostics``: a JSON
string of the method's notes (speckle_rec writes its stage timings, pivot and sign decisions and
where its first out-of-plane direction came from). Any method (ours, a learned model's
``predict_ddfs`` output, the identity) is compared through this one format.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .ddf import DEFAULT_CHUNK_FRAMES, landmark_ddfs, pixel_ddfs
from .errors import DataError
from .io import atomic_path, open_h5
from .transforms import check_rigid, globals_from_locals, locals_from_globals

DDF_KEYS = ("GP", "GL", "LP", "LL")


def prediction_path(pred_dir, subject, scan):
    """``pred_dir/<subject>/<scan>.h5``."""
    return Path(pred_dir) / subject / f"{scan}.h5"


def _check_ddf_arrays(ddfs, n_transforms):
    shapes = {k: tuple(v.shape) for k, v in ddfs.items()}
    gp, lp, gl, ll = shapes["GP"], shapes["LP"], shapes["GL"], shapes["LL"]
    if len(gp) != 3 or gp[1] != 3 or gp != lp:
        raise DataError(f"expected GP and LP of one shape (N-1, 3, H*W), got {gp} and {lp}")
    if len(gl) != 2 or gl[0] != 3 or gl != ll:
        raise DataError(f"expected GL and LL of one shape (3, K), got {gl} and {ll}")
    if n_transforms is not None and gp[0] != n_transforms:
        raise DataError(f"DDFs have {gp[0]} frames but the transforms have {n_transforms}")


def write_prediction(
    path,
    *,
    global_transforms=None,
    local_transforms=None,
    GP=None,
    GL=None,
    LP=None,
    LL=None,
    ddf_grid=None,
    landmarks=None,
    wall_time_s=None,
    diagnostics=None,
    chunk_frames=DEFAULT_CHUNK_FRAMES,
):
    """Write one scan's prediction atomically (nothing is left under ``path`` on failure).

    Parameters
    ----------
    path : str or Path
        Usually :func:`prediction_path`.
    global_transforms, local_transforms : array_like, shape (N-1, 4, 4), optional
        Rigid image-mm transforms; give either or both (the missing one is derived by chaining).
    GP, GL, LP, LL : array_like, optional
        The four DDFs as returned by a challenge ``predict_ddfs`` (all four or none). Dense fields
        may be memmaps or h5py datasets; they are copied chunk by chunk.
    ddf_grid : PixelGrid, optional
        With transforms and ``landmarks``: also compute and write the four DDFs from the transforms,
        in chunks (the ``--ddf`` output).
    landmarks : array_like of int, shape (K, 3), optional
        The scan's landmarks, needed with ``ddf_grid``.
    wall_time_s : float, optional
        Seconds taken to predict the scan, stored as an attribute.
    diagnostics : dict, optional
        JSON-serialisable notes of the method (speckle_rec: its stage timings, pivot and sign
        decisions), stored as the JSON attribute ``diagnostics``.
    chunk_frames : int
        Frames per chunk for dense fields.
    """
    if global_transforms is not None:
        global_transforms = check_rigid(global_transforms, name="global_transforms")
    if local_transforms is not None:
        local_transforms = check_rigid(local_transforms, name="local_transforms")
    if global_transforms is None and local_transforms is not None:
        global_transforms = globals_from_locals(local_transforms)
    if local_transforms is None and global_transforms is not None:
        local_transforms = locals_from_globals(global_transforms)
    if global_transforms is not None:
        if global_transforms.ndim != 3 or global_transforms.shape != local_transforms.shape:
            raise DataError(
                f"expected global and local transforms of one shape (N-1, 4, 4), got "
                f"{global_transforms.shape} and {local_transforms.shape}"
            )
    given = {k: v for k, v in dict(GP=GP, GL=GL, LP=LP, LL=LL).items() if v is not None}
    if given and len(given) != 4:
        raise DataError(f"give all four DDFs or none, got only {', '.join(given)}")
    if given and ddf_grid is not None:
        raise DataError("give DDF arrays or ddf_grid, not both")
    if ddf_grid is not None and (global_transforms is None or landmarks is None):
        raise DataError("ddf_grid needs transforms and landmarks")
    if global_transforms is None and not given:
        raise DataError("nothing to write: give transforms and/or the four DDFs")
    n_transforms = None if global_transforms is None else global_transforms.shape[0]
    if given:
        _check_ddf_arrays(given, n_transforms)

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as out:
        if global_transforms is not None:
            out.create_dataset("global_transforms", data=global_transforms, dtype=np.float64)
            out.create_dataset("local_transforms", data=local_transforms, dtype=np.float64)
        if ddf_grid is not None:
            shape = (n_transforms, 3, ddf_grid.n_pixels)
            for key, transforms in (("GP", global_transforms), ("LP", local_transforms)):
                dense = out.create_dataset(key, shape=shape, dtype=np.float32, chunks=(1, 3, shape[2]))
                pixel_ddfs(transforms, ddf_grid, out=dense, chunk_frames=chunk_frames)
            out.create_dataset("GL", data=landmark_ddfs(global_transforms, landmarks, ddf_grid))
            out.create_dataset("LL", data=landmark_ddfs(local_transforms, landmarks, ddf_grid))
        for key, value in given.items():
            if key in ("GL", "LL"):
                array = np.asarray(value, dtype=np.float32)
                if not np.all(np.isfinite(array)):
                    raise DataError(f"{key} contains NaN or inf")
                out.create_dataset(key, data=array)
                continue
            dense = out.create_dataset(key, shape=value.shape, dtype=np.float32, chunks=(1, 3, value.shape[2]))
            for start in range(0, value.shape[0], chunk_frames):
                chunk = np.asarray(value[start : start + chunk_frames], dtype=np.float32)
                if not np.all(np.isfinite(chunk)):
                    raise DataError(f"{key} contains NaN or inf")
                dense[start : start + chunk.shape[0]] = chunk
        if wall_time_s is not None:
            out.attrs["wall_time_s"] = float(wall_time_s)
        if diagnostics is not None:
            out.attrs["diagnostics"] = json.dumps(diagnostics)


@dataclass
class Prediction:
    """One scan's prediction, opened for reading (dense fields stay on disk as h5py datasets)."""

    path: Path
    global_transforms: np.ndarray | None
    local_transforms: np.ndarray | None
    GP: object
    GL: np.ndarray | None
    LP: object
    LL: np.ndarray | None
    wall_time_s: float | None
    diagnostics: dict | None = None

    @property
    def has_ddfs(self):
        return self.GP is not None

    @property
    def has_transforms(self):
        return self.global_transforms is not None


@contextlib.contextmanager
def open_prediction(path, *, n_frames, n_pixels, n_landmarks):
    """Open and validate a prediction file against its scan.

    Parameters
    ----------
    path : str or Path
    n_frames : int
        Frames N of the scan (predictions hold N−1 rows).
    n_pixels : int
        H·W of the scan.
    n_landmarks : int
        K of the scan's landmarks.

    Yields
    ------
    Prediction

    Raises
    ------
    DataError
        Missing file or keys, shapes that do not match the scan (frame count, pixels, landmarks),
        NaN/inf or non-rigid transforms.
    """
    path = Path(path)
    with open_h5(path) as handle:
        keys = set(handle.keys())
        has_t = {"global_transforms", "local_transforms"} <= keys
        has_d = set(DDF_KEYS) <= keys
        if not (has_t or has_d):
            raise DataError(
                "expected global_transforms and local_transforms and/or GP, GL, LP, LL; "
                f"found {', '.join(sorted(keys)) or 'nothing'}",
                path,
            )
        expected = n_frames - 1
        transforms = {}
        if has_t:
            for key in ("global_transforms", "local_transforms"):
                value = handle[key][()]
                if value.ndim != 3 or value.shape[1:] != (4, 4):
                    raise DataError(f"expected {key} of shape (N-1, 4, 4), got {value.shape}", path)
                if value.shape[0] != expected:
                    raise DataError(
                        f"{key} has {value.shape[0]} rows but the scan has {n_frames} frames "
                        f"(expected {expected})",
                        path,
                    )
                transforms[key] = check_rigid(value, name=key, source=path)
        ddfs = {k: None for k in DDF_KEYS}
        if has_d:
            for key in ("GP", "LP"):
                node = handle[key]
                if tuple(node.shape) != (expected, 3, n_pixels):
                    raise DataError(
                        f"expected {key} of shape ({expected}, 3, {n_pixels}) for a scan of {n_frames} "
                        f"frames, got {tuple(node.shape)}",
                        path,
                    )
                ddfs[key] = node
            for key in ("GL", "LL"):
                value = np.asarray(handle[key][()], dtype=np.float32)
                if value.shape != (3, n_landmarks):
                    raise DataError(f"expected {key} of shape (3, {n_landmarks}), got {value.shape}", path)
                if not np.all(np.isfinite(value)):
                    raise DataError(f"{key} contains NaN or inf", path)
                ddfs[key] = value
        wall = handle.attrs.get("wall_time_s")
        notes = handle.attrs.get("diagnostics")
        try:
            notes = None if notes is None else json.loads(notes)
        except (TypeError, ValueError):
            raise DataError("attribute diagnostics is not JSON", path) from None
        yield Prediction(
            path=path,
            global_transforms=transforms.get("global_transforms"),
            local_transforms=transforms.get("local_transforms"),
            wall_time_s=None if wall is None else float(wall),
            diagnostics=notes,
            **ddfs,
        )
