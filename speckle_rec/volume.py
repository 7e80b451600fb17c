"""Compounding a scan's frames into a voxel volume at their poses (the `speckle-rec volume` job).

Every pixel inside the imaged fan is placed at ``frame_to_first[i] · S · p`` in frame-0 image-mm
coordinates and binned to its nearest voxel; each voxel holds the mean of the pixels it received
(mean compounding). Empty voxels inside the swept region (gaps between frames) are then filled from
their neighbours, a few voxels deep at most; voxels far from every frame stay 0. Frames are read
chunk by chunk, so an h5py dataset of a whole scan is never loaded at once.

The grid is axis-aligned with frame 0: x along its columns, y along its rows (depth), z along its
normal, in mm, with the origin at the centre of voxel (0, 0, 0), as SimpleITK and 3D Slicer expect.
"""

import contextlib
import math
from pathlib import Path

import numba
import numpy as np

from . import _volume_kernels as kernels
from .ddf import PixelGrid
from .errors import DataError
from .io import open_h5
from .prediction import open_prediction, prediction_path
from .progress import progress_bar
from .transforms import check_rigid, transforms_from_tforms

DEFAULT_VOXEL_MM = 0.5
DEFAULT_FILL_MM = 2.0
DEFAULT_MAX_BYTES = 4 * 1024**3
# float32 sum and count per voxel while compounding, plus a one-byte "measured" flag when dividing.
BYTES_PER_VOXEL = 9
VOLUME_SUFFIXES = (".mha", ".nrrd")
FAN_SAMPLE_FRAMES = 64


def fan_mask(frames, *, sample_frames=FAN_SAMPLE_FRAMES, min_fraction=0.5):
    """Pixels inside the imaged fan: nonzero in at least ``min_fraction`` of sampled frames.

    Outside the fan, B-mode frames are exactly 0; inside, dark speckle is rarely 0 for long.

    Parameters
    ----------
    frames : array-like of uint8, shape (N, H, W)
        An ndarray or an h5py dataset (only the sampled frames are read).
    sample_frames : int
        Frames sampled evenly over the scan.
    min_fraction : float
        Fraction of sampled frames in which a pixel must be nonzero.

    Returns
    -------
    ndarray of bool, shape (H, W)
    """
    n = frames.shape[0]
    picks = np.unique(np.linspace(0, n - 1, min(sample_frames, n)).round().astype(np.int64))
    nonzero = np.zeros(frames.shape[1:], dtype=np.int64)
    for i in picks:
        nonzero += np.asarray(frames[int(i)]) > 0
    return nonzero >= min_fraction * len(picks)


def _full_poses(frame_to_first, n_frames):
    g = check_rigid(frame_to_first, name="frame_to_first")
    if g.ndim != 3 or g.shape[0] != n_frames - 1:
        raise DataError(f"expected frame_to_first of shape ({n_frames - 1}, 4, 4) for {n_frames} frames, "
                        f"got {g.shape}")
    return np.concatenate([np.eye(4)[None], g])


def _mask_pixels(mask, shape_hw):
    mask = np.asarray(mask)
    if mask.shape != tuple(shape_hw):
        raise DataError(f"expected a mask of shape {tuple(shape_hw)}, got {mask.shape}")
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise DataError("the pixel mask is empty: no pixel would contribute")
    return rows.astype(np.int64), cols.astype(np.int64)


def volume_grid(poses, rows, cols, *, spacing_mm, voxel_mm):
    """Origin and shape of the axis-aligned grid holding every contributing pixel.

    Parameters
    ----------
    poses : ndarray, shape (N, 4, 4)
        Frame i image-mm → frame-0 image-mm (row 0 the identity).
    rows, cols : ndarray of int, shape (P,)
        0-based positions of the contributing pixels.
    spacing_mm : (float, float)
        (sx, sy) mm per pixel along columns and rows.
    voxel_mm : float
        Voxel edge in mm.

    Returns
    -------
    origin_mm : ndarray, shape (3,)
        Centre of voxel (0, 0, 0): (x, y, z) in frame-0 image-mm.
    shape : tuple of int
        (Z, Y, X) voxels.
    """
    sx, sy = spacing_mm
    # The pixels' bounding rectangle is a planar quad per frame, so its transformed corners bound them.
    corners = np.array([[sx * (c + 1), sy * (r + 1), 0.0, 1.0]
                        for r in (rows.min(), rows.max()) for c in (cols.min(), cols.max())])
    points = np.einsum("nij,kj->nki", poses[:, :3], corners).reshape(-1, 3)
    low, high = points.min(axis=0), points.max(axis=0)
    size = np.ceil((high - low) / voxel_mm).astype(np.int64) + 1
    return low, (int(size[2]), int(size[1]), int(size[0]))


def _check_memory(shape, voxel_mm, max_bytes):
    needed = BYTES_PER_VOXEL * math.prod(shape)
    if needed <= max_bytes:
        return
    larger = math.ceil(voxel_mm * (needed / max_bytes) ** (1 / 3) * 10) / 10
    nz, ny, nx = shape
    raise DataError(
        f"a {nx}x{ny}x{nz} voxel grid at {voxel_mm:g} mm needs {needed / 1024**3:.3g} GB, over the "
        f"{max_bytes / 1024**3:.3g} GB limit; use a larger --spacing (e.g. {larger:g}) or raise "
        "--max-memory-gb"
    )


def _fill_holes(volume, flags, fill_voxels):
    from scipy import ndimage

    size = 2 * fill_voxels + 1
    # Morphological closing of the measured voxels: gaps narrower than the cube are inside the swept
    # region, while the outer surface of the sweep does not grow.
    region = ndimage.minimum_filter(ndimage.maximum_filter(flags, size=size, mode="constant"), size=size,
                                    mode="nearest")
    for iteration in range(1, 255):
        if kernels.fill_kernel(volume, flags, region, iteration) == 0:
            break


def compound_volume(frames, frame_to_first, *, spacing_mm, voxel_mm=DEFAULT_VOXEL_MM, mask=None,
                    fill_mm=DEFAULT_FILL_MM, max_bytes=DEFAULT_MAX_BYTES, chunk_frames=16, progress=False):
    """Mean-compound frames into a voxel volume at their poses.

    Parameters
    ----------
    frames : array-like of uint8, shape (N, H, W)
        An ndarray or an h5py dataset; read ``chunk_frames`` frames at a time.
    frame_to_first : array_like, shape (N-1, 4, 4)
        Rigid image-mm transforms frame i → frame 0 (row i−1 is frame i), e.g. a prediction's
        ``global_transforms``.
    spacing_mm : (float, float)
        (sx, sy) mm per pixel along columns and rows.
    voxel_mm : float
        Voxel edge in mm.
    mask : array_like of bool, shape (H, W), optional
        Pixels that contribute (default: the imaged fan, :func:`fan_mask`).
    fill_mm : float
        Fill empty voxels inside the swept region up to this far from measured ones (0: no filling).
    max_bytes : int
        Refuse grids whose working memory (``BYTES_PER_VOXEL`` per voxel) exceeds this.
    chunk_frames : int
        Frames read and binned at a time.
    progress : bool
        Show a progress bar on stderr.

    Returns
    -------
    volume : ndarray of float32, shape (Z, Y, X)
        Mean intensity per voxel (0 where nothing was measured or filled).
    origin_mm : ndarray, shape (3,)
        (x, y, z) of the centre of voxel (0, 0, 0) in frame-0 image-mm.
    voxel_mm : float

    Raises
    ------
    DataError
        On bad shapes, spacing or transforms, an empty mask, or a grid over ``max_bytes``.
    """
    if len(frames.shape) != 3 or frames.dtype != np.uint8:
        raise DataError(f"expected uint8 frames of shape (N, H, W), got {frames.dtype} {tuple(frames.shape)}")
    n_frames, height, width = (int(v) for v in frames.shape)
    sx, sy = (float(v) for v in spacing_mm)
    voxel_mm, fill_mm = float(voxel_mm), float(fill_mm)
    if not (sx > 0 and sy > 0 and voxel_mm > 0 and fill_mm >= 0 and chunk_frames >= 1):
        raise DataError(f"expected positive spacing, voxel size and chunk, got spacing ({sx}, {sy}) mm, "
                        f"voxel {voxel_mm} mm, fill {fill_mm} mm, chunk {chunk_frames}")
    poses = _full_poses(frame_to_first, n_frames)
    rows, cols = _mask_pixels(fan_mask(frames) if mask is None else mask, (height, width))
    origin, shape = volume_grid(poses, rows, cols, spacing_mm=(sx, sy), voxel_mm=voxel_mm)
    _check_memory(shape, voxel_mm, max_bytes)

    mm_to_voxel = np.eye(4)
    mm_to_voxel[:3, :3] /= voxel_mm
    mm_to_voxel[:3, 3] = -origin / voxel_mm
    to_voxel = np.ascontiguousarray(mm_to_voxel @ poses)
    nz, ny, nx = shape
    qx, qy = sx * (cols + 1.0), sy * (rows + 1.0)
    pixels = rows * width + cols
    sums = np.zeros(shape, dtype=np.float32)
    counts = np.zeros(shape, dtype=np.float32)
    n_parts = 1 << (numba.get_num_threads().bit_length() - 1)
    index = np.empty((min(chunk_frames, n_frames), pixels.size), dtype=np.int64)
    part = np.empty(index.shape, dtype=np.uint8)
    with progress_bar(total=n_frames, desc="compound", unit="frame", enabled=progress) as bar:
        for start in range(0, n_frames, chunk_frames):
            stop = min(start + chunk_frames, n_frames)
            chunk = np.ascontiguousarray(frames[start:stop], dtype=np.uint8).reshape(stop - start, -1)
            idx, prt = index[: stop - start], part[: stop - start]
            kernels.voxel_index_kernel(to_voxel[start:stop], qx, qy, nz, ny, nx, n_parts - 1, idx, prt)
            kernels.accumulate_kernel(chunk, pixels, idx, prt, n_parts, sums.reshape(-1), counts.reshape(-1))
            bar.update(stop - start)

    measured = counts > 0
    np.divide(sums, counts, out=sums, where=measured)
    del counts
    flags = measured.view(np.uint8)
    fill_voxels = int(math.floor(fill_mm / voxel_mm + 1e-9))
    if fill_voxels:
        _fill_holes(sums, flags, fill_voxels)
    return sums, origin, voxel_mm


def write_volume(path, volume, origin_mm, voxel_mm):
    """Write a volume with SimpleITK (``.mha`` or ``.nrrd``), spacing and origin set, direction identity.

    Parameters
    ----------
    path : str or Path
        Output file; its suffix picks the format.
    volume : ndarray, shape (Z, Y, X)
    origin_mm : array_like, shape (3,)
        (x, y, z) of the centre of voxel (0, 0, 0), mm.
    voxel_mm : float
        Isotropic voxel edge, mm.
    """
    import SimpleITK as sitk

    path = Path(path)
    check_volume_path(path)
    volume = np.asarray(volume)
    origin = np.asarray(origin_mm, dtype=np.float64)
    if volume.ndim != 3 or origin.shape != (3,) or not float(voxel_mm) > 0:
        raise DataError(f"expected a (Z, Y, X) volume, a 3-vector origin and a positive voxel size, got "
                        f"{volume.shape}, {origin.shape}, {voxel_mm}", path)
    image = sitk.GetImageFromArray(volume, isVector=False)
    image.SetSpacing((float(voxel_mm),) * 3)
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name with the same suffix (SimpleITK picks the format from it).
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        sitk.WriteImage(image, str(tmp), useCompression=True)
        tmp.replace(path)
    except RuntimeError as exc:
        raise DataError(f"cannot write volume ({str(exc).strip().splitlines()[-1]})", path) from None
    finally:
        tmp.unlink(missing_ok=True)


def check_volume_path(path):
    """Refuse an output name SimpleITK would not write as a 3D Slicer-readable volume."""
    if Path(path).suffix.lower() not in VOLUME_SUFFIXES:
        raise DataError(f"expected a volume file ending in {' or '.join(VOLUME_SUFFIXES)}", path)


# -------------------------------------------------------------------------------- poses of a scan
def corner_pixels(grid):
    """Flat indices (4,) of the image corners (1,1), (W,1), (W,H), (1,H), in drawing order."""
    h, w = grid.height, grid.width
    return np.array([0, w - 1, h * w - 1, (h - 1) * w], dtype=np.int64)


def corner_points_mm(grid):
    """Image-mm points (4, 3) of the corners in :func:`corner_pixels` order."""
    sx, sy = grid.spacing_mm
    h, w = grid.height, grid.width
    return np.array([[sx, sy, 0.0], [sx * w, sy, 0.0], [sx * w, sy * h, 0.0], [sx, sy * h, 0.0]])


def ddf_at_pixels(dense, pixels, *, chunk_frames=32):
    """Values of a dense DDF at a few pixels, read chunk by chunk.

    Parameters
    ----------
    dense : array-like, shape (n, 3, P)
        ndarray or h5py dataset (``GP`` or ``LP``).
    pixels : ndarray of int, shape (k,)
        Flat pixel indices.
    chunk_frames : int

    Returns
    -------
    ndarray, shape (n, 3, k), float64
    """
    pixels = np.asarray(pixels, dtype=np.int64)
    out = np.empty((dense.shape[0], 3, pixels.size))
    for start in range(0, dense.shape[0], chunk_frames):
        # h5py reads whole (frame) chunks anyway: take a slab and pick the pixels in memory.
        slab = np.asarray(dense[start : start + chunk_frames])
        out[start : start + slab.shape[0]] = slab[:, :, pixels]
    return out


def rigid_from_displacements(points_mm, displacements):
    """Least-squares rigid transforms (Kabsch) taking points to points + displacements.

    Parameters
    ----------
    points_mm : ndarray, shape (k, 3)
        At least three non-collinear points, e.g. image corners in image-mm.
    displacements : ndarray, shape (n, 3, k)
        Their displacements per frame, mm (a DDF sampled at the points).

    Returns
    -------
    ndarray, shape (n, 4, 4), float64
    """
    p = np.asarray(points_mm, dtype=np.float64)
    moved = p[None] + np.swapaxes(np.asarray(displacements, dtype=np.float64), 1, 2)
    p_mean, m_mean = p.mean(axis=0), moved.mean(axis=1)
    cov = np.einsum("ki,nkj->nij", p - p_mean, moved - m_mean[:, None])
    u, _, vt = np.linalg.svd(cov)
    d = np.sign(np.linalg.det(np.swapaxes(vt, 1, 2) @ np.swapaxes(u, 1, 2)))
    fix = np.tile(np.eye(3), (len(d), 1, 1))
    fix[:, 2, 2] = d
    rotation = np.swapaxes(vt, 1, 2) @ fix @ np.swapaxes(u, 1, 2)
    out = np.tile(np.eye(4), (len(d), 1, 1))
    out[:, :3, :3] = rotation
    out[:, :3, 3] = m_mean - np.einsum("nij,j->ni", rotation, p_mean)
    return out


@contextlib.contextmanager
def open_scan_prediction(pred_dir, scan, grid):
    """Open ``pred_dir/<subject>/<scan>.h5`` validated against ``scan`` (a ScanRef).

    Landmark counts are checked against the scan's landmark file when it has one, else taken from
    the prediction itself (nothing to compare with).
    """
    path = prediction_path(pred_dir, scan.subject, scan.name)
    if not path.is_file():
        raise DataError(f"no prediction for {scan.key}", path)
    n_frames = scan.shape()[0]
    if scan.landmarks_path is not None:
        n_landmarks = len(scan.read_landmarks())
    else:
        with open_h5(path) as handle:
            n_landmarks = int(handle["GL"].shape[-1]) if "GL" in handle else 0
    with open_prediction(path, n_frames=n_frames, n_pixels=grid.n_pixels, n_landmarks=n_landmarks) as pred:
        yield pred


def scan_poses(scan, calibration, *, pred_dir=None, truth=False):
    """``frame_to_first`` (N-1, 4, 4) of a scan: ground truth from its tforms, or a prediction's.

    A prediction with only DDFs gives rigid poses fitted to its ``GP`` at the image corners.

    Parameters
    ----------
    scan : speckle_rec.io.ScanRef
    calibration : speckle_rec.calibration.Calibration
    pred_dir : str or Path, optional
        Prediction folder (needed unless ``truth``).
    truth : bool
        Use the tracked ground truth.
    """
    if truth:
        tforms = scan.read_tforms()
        return transforms_from_tforms(tforms, calibration.image_to_tool, source=scan.tforms_path)[0]
    if pred_dir is None:
        raise DataError("give a prediction folder (--pred) or use the ground truth (--truth)")
    _, height, width = scan.shape()
    grid = PixelGrid.from_calibration(calibration, height, width)
    with open_scan_prediction(pred_dir, scan, grid) as prediction:
        if prediction.has_transforms:
            return prediction.global_transforms
        displacements = ddf_at_pixels(prediction.GP, corner_pixels(grid))
        if not np.all(np.isfinite(displacements)):
            raise DataError("GP contains NaN or inf", prediction.path)
    return rigid_from_displacements(corner_points_mm(grid), displacements)
