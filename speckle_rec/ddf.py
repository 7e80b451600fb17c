"""Dense and landmark displacement fields (DDFs) from rigid transforms (contract §4).

``GP``/``LP``: float32 (N−1, 3, H·W); ``GL``/``LL``: float32 (3, K). Axis 1 / 0 is (x, y, z) in mm in
the reference frame's image-mm coordinates; the pixel axis is row-major over (row, column), x
fastest, with 1-based pixel coordinates. Dense fields can be written into caller-provided arrays
(including ``np.memmap`` and h5py datasets) in chunks, so memory stays at the output plus a constant.
"""

import os
import threading
from dataclasses import dataclass

import numpy as np

from . import _ddf_kernels as kernels
from .errors import DataError

DEFAULT_CHUNK_FRAMES = 32


@dataclass(frozen=True)
class PixelGrid:
    """The reference pixel grid of a scan: image size and pixel spacing.

    Attributes
    ----------
    height, width : int
        Rows and columns.
    spacing_mm : tuple of float
        (sx, sy): mm per pixel along columns (x) and rows (y), the diagonal of ``pixel_to_mm``.
    """

    height: int
    width: int
    spacing_mm: tuple

    def __post_init__(self):
        sx, sy = (float(v) for v in self.spacing_mm)
        if int(self.height) < 1 or int(self.width) < 1 or not (sx > 0 and sy > 0):
            raise DataError(f"invalid pixel grid {self.height}x{self.width} at spacing ({sx}, {sy}) mm")
        object.__setattr__(self, "height", int(self.height))
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "spacing_mm", (sx, sy))

    @classmethod
    def from_calibration(cls, calibration, height, width):
        return cls(height, width, calibration.spacing_mm)

    @property
    def n_pixels(self):
        return self.height * self.width

    def points_mm(self):
        """Homogeneous image-mm points of every pixel, (4, H·W) float64, in the contract's order."""
        sx, sy = self.spacing_mm
        y, x = np.meshgrid(np.arange(1, self.height + 1), np.arange(1, self.width + 1), indexing="ij")
        return np.stack([sx * x.ravel(), sy * y.ravel(), np.zeros(x.size), np.ones(x.size)])


def _transforms_array(transforms, name="transforms"):
    t = np.ascontiguousarray(transforms, dtype=np.float64)
    if t.ndim != 3 or t.shape[1:] != (4, 4):
        raise DataError(f"expected {name} of shape (N-1, 4, 4), got {t.shape}")
    if not np.all(np.isfinite(t)):
        raise DataError(f"{name} contains NaN or inf")
    return t


def pixel_ddfs(transforms, grid, *, out=None, chunk_frames=DEFAULT_CHUNK_FRAMES):
    """Dense displacement field of every pixel for each transform.

    Parameters
    ----------
    transforms : array_like, shape (n, 4, 4)
        Rigid image-mm transforms (e.g. ``frame_to_first`` for GP, ``frame_to_previous`` for LP).
    grid : PixelGrid
    out : array-like, shape (n, 3, H·W), optional
        Where to write. A C-contiguous float32 ndarray (``np.memmap`` included) is written in place;
        anything else supporting slice assignment (e.g. an h5py dataset) is filled chunk by chunk
        through a reused buffer of ``chunk_frames`` frames.
    chunk_frames : int
        Frames per chunk when ``out`` is not a float32 ndarray.

    Returns
    -------
    out : float32 array, shape (n, 3, H·W)
        Displacements in mm.
    """
    t = _transforms_array(transforms)
    shape = (t.shape[0], 3, grid.n_pixels)
    sx, sy = grid.spacing_mm
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    if tuple(out.shape) != shape:
        raise DataError(f"expected out of shape {shape}, got {tuple(out.shape)}")
    if isinstance(out, np.ndarray) and out.dtype == np.float32 and out.flags.c_contiguous:
        kernels.pixel_ddf_kernel(t, sx, sy, grid.height, grid.width, out)
        return out
    buffer = np.empty((min(chunk_frames, shape[0]),) + shape[1:], dtype=np.float32)
    for start in range(0, shape[0], chunk_frames):
        stop = min(start + chunk_frames, shape[0])
        chunk = buffer[: stop - start]
        kernels.pixel_ddf_kernel(t[start:stop], sx, sy, grid.height, grid.width, chunk)
        out[start:stop] = chunk
    return out


class PrefaultedOutputs:
    """Allocate float32 arrays now and fault their pages in on a background thread at low priority.

    The first write to fresh memory costs a page fault per page, paid in system time: measured
    0.5-24 s for one 5.9 GB dense field on the shared 2-core VM. Started before the trajectory
    estimation, whose bundle adjustment leaves a core idle, the faults are mostly hidden behind
    it. The thread runs at nice 19 (Linux sets priorities per thread), so it takes only cycles no
    other thread wants.

    Parameters
    ----------
    shapes : sequence of tuple of int
        One float32 array of each shape.

    Notes
    -----
    The arrays' contents are unspecified (zero where touched); they are meant to be overwritten.
    Call :meth:`arrays` (waits for the thread) or :meth:`cancel` exactly once.
    """

    _PAGE_FLOATS = 1024  # one float32 per 4 KiB page faults the whole page in

    def __init__(self, shapes):
        self._arrays = [np.empty(tuple(int(n) for n in shape), dtype=np.float32) for shape in shapes]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._touch, name="speckle_rec-prefault", daemon=True)
        self._thread.start()

    def _touch(self):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):  # not Linux or not allowed: touch at normal priority
            pass
        chunk = 16384 * self._PAGE_FLOATS  # 64 MiB between checks of the stop flag
        for array in self._arrays:
            flat = array.reshape(-1)
            for start in range(0, flat.size, chunk):
                if self._stop.is_set():
                    return
                flat[start:start + chunk:self._PAGE_FLOATS] = 0.0  # NumPy releases the GIL here

    def arrays(self):
        """The arrays, once every page has been touched."""
        self._thread.join()
        return self._arrays

    def cancel(self):
        """Stop touching (e.g. the estimation failed) and drop the arrays."""
        self._stop.set()
        self._thread.join()
        self._arrays = []


def landmark_ddfs(transforms, landmarks, grid):
    """Displacement of each landmark under the transform of its frame.

    Parameters
    ----------
    transforms : array_like, shape (N-1, 4, 4)
        Row f − 1 is the transform of frame f.
    landmarks : array_like of int, shape (K, 3)
        (frame index ≥ 1, x, y) with 1-based x (column) and y (row), as validated by
        :func:`speckle_rec.io.check_landmarks`.
    grid : PixelGrid

    Returns
    -------
    ndarray, shape (3, K), float32
    """
    t = _transforms_array(transforms)
    lm = np.ascontiguousarray(landmarks, dtype=np.int64)
    if lm.ndim != 2 or lm.shape[1] != 3:
        raise DataError(f"expected landmarks of shape (K, 3), got {lm.shape}")
    if lm.size and (lm[:, 0].min() < 1 or lm[:, 0].max() > t.shape[0]):
        raise DataError(f"landmark frame indices must lie in 1..{t.shape[0]}")
    out = np.empty((3, lm.shape[0]), dtype=np.float32)
    sx, sy = grid.spacing_mm
    kernels.landmark_ddf_kernel(t, lm, sx, sy, out)
    return out


def ddfs_from_transforms(frame_to_first, frame_to_previous, landmarks, grid, *, out=None):
    """The four challenge outputs (GP, GL, LP, LL) from global and local transforms, in memory.

    Parameters
    ----------
    frame_to_first, frame_to_previous : array_like, shape (N-1, 4, 4)
    landmarks : array_like of int, shape (K, 3)
    grid : PixelGrid
    out : (GP, LP) pair of arrays, optional
        Where to write the dense fields (see :func:`pixel_ddfs`), e.g. from :class:`PrefaultedOutputs`.

    Returns
    -------
    GP : float32 (N-1, 3, H·W)
    GL : float32 (3, K)
    LP : float32 (N-1, 3, H·W)
    LL : float32 (3, K)
    """
    gp, lp = (None, None) if out is None else out
    return (
        pixel_ddfs(frame_to_first, grid, out=gp),
        landmark_ddfs(frame_to_first, landmarks, grid),
        pixel_ddfs(frame_to_previous, grid, out=lp),
        landmark_ddfs(frame_to_previous, landmarks, grid),
    )
