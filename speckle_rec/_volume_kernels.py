"""Numba kernels for compounding frames into a voxel grid (arrays and scalars only).

A frame pixel at 0-based (row r, column c) is the image-mm point q = (sx·(c+1), sy·(r+1), 0) of the
contract's 1-based grid; the caller passes q. ``to_voxel[i]`` maps frame i's image-mm coordinates to
continuous voxel coordinates (u, v, w) = (x, y, z index); the pixel goes to the nearest voxel,
floor(u + 0.5), and is dropped outside the grid. Volumes are C-ordered (Z, Y, X); flat volumes are
indexed (w·NY + v)·NX + u.
The Python layer (volume.py) validates and converts before calling these.
"""

import numba
import numpy as np
from numba import prange

# Voxels are dealt to threads in blocks of 2**BLOCK_SHIFT along each axis: a frame plane crosses
# many blocks whatever its orientation, so every thread gets a share of every chunk of frames.
BLOCK_SHIFT = 3


@numba.njit(cache=True, parallel=True)
def voxel_index_kernel(to_voxel, qx, qy, nz, ny, nx, part_mask, index, part):
    """Nearest voxel of every listed pixel of every frame.

    to_voxel (n, 4, 4) f64; qx, qy (P,) f64 image-mm coordinates of the pixels; index (n, P) int64
    gets the flat voxel index, or −1 outside the grid; part (n, P) uint8 the thread share owning
    that voxel, in 0..part_mask (shares are a power of two).
    """
    fnx, fny, fnz = float(nx), float(ny), float(nz)
    for i in prange(to_voxel.shape[0]):
        t = to_voxel[i]
        a00, a01, a03 = t[0, 0], t[0, 1], t[0, 3] + 0.5
        a10, a11, a13 = t[1, 0], t[1, 1], t[1, 3] + 0.5
        a20, a21, a23 = t[2, 0], t[2, 1], t[2, 3] + 0.5
        for k in range(qx.shape[0]):
            # + 0.5 then truncation rounds to the nearest voxel for values ≥ 0. Branch-free, clamped
            # 32-bit conversions (always defined) so the loop vectorises.
            fu = a00 * qx[k] + a01 * qy[k] + a03
            fv = a10 * qx[k] + a11 * qy[k] + a13
            fw = a20 * qx[k] + a21 * qy[k] + a23
            inside = (fu >= 0.0) & (fu < fnx) & (fv >= 0.0) & (fv < fny) & (fw >= 0.0) & (fw < fnz)
            u = np.int32(min(max(fu, 0.0), fnx))
            v = np.int32(min(max(fv, 0.0), fny))
            w = np.int32(min(max(fw, 0.0), fnz))
            index[i, k] = (np.int64(w) * ny + v) * nx + u if inside else -1
            part[i, k] = np.uint8(((u >> BLOCK_SHIFT) + (v >> BLOCK_SHIFT) + (w >> BLOCK_SHIFT)) & part_mask)


@numba.njit(cache=True, parallel=True)
def accumulate_kernel(frames, pixels, index, part, n_parts, sums, counts):
    """sums[index] += frames[i, pixels]; counts[index] += 1.

    frames (n, H·W) uint8; pixels (P,) int64 flat pixel indices; sums, counts flat f32 volumes.
    Each thread owns the voxels of one share (``part``), so no two threads write the same voxel.
    """
    for p in prange(n_parts):
        for i in range(index.shape[0]):
            for k in range(index.shape[1]):
                j = index[i, k]
                if j >= 0 and part[i, k] == p:
                    sums[j] += frames[i, pixels[k]]
                    counts[j] += 1.0


@numba.njit(cache=True, parallel=True)
def fill_kernel(volume, flags, region, iteration):
    """One pass of hole filling on (Z, Y, X) arrays, in place; returns the number of voxels filled.

    A voxel is known when 0 < flags ≤ iteration (1 = measured, k + 1 = filled in pass k). An unknown
    voxel inside ``region`` with known voxels among its 26 neighbours takes their mean and gets
    flags = iteration + 1; voxels filled in this pass are not yet known, so the order of visits does
    not matter and threads never read a value another thread writes.
    """
    nz, ny, nx = volume.shape
    filled = 0
    for z in prange(nz):
        for y in range(ny):
            for x in range(nx):
                if flags[z, y, x] != 0 or region[z, y, x] == 0:
                    continue
                total = 0.0
                count = 0
                for zz in range(max(z - 1, 0), min(z + 2, nz)):
                    for yy in range(max(y - 1, 0), min(y + 2, ny)):
                        for xx in range(max(x - 1, 0), min(x + 2, nx)):
                            f = flags[zz, yy, xx]
                            if f != 0 and f <= iteration:
                                total += volume[zz, yy, xx]
                                count += 1
                if count:
                    volume[z, y, x] = total / count
                    flags[z, y, x] = iteration + 1
                    filled += 1
    return filled
