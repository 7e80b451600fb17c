"""Numba kernels for patch statistics of frame pairs (arrays and scalars only).

Pixel coordinates here are 0-based (column u, row v) array indices; the Python layer
(:mod:`speckle_rec.outofplane`) converts from image-mm and validates before calling.
"""

import math

import numba
import numpy as np
from numba import prange


@numba.njit(cache=True, nogil=True)
def _sample_ok(u, v, mask):
    h, w = mask.shape
    if u < 0.0 or v < 0.0 or u > w - 1.0 or v > h - 1.0:
        return False
    return mask[int(v + 0.5), int(u + 0.5)]


@numba.njit(cache=True, parallel=True, nogil=True)
def patch_ncc_kernel(frames, fixed_index, moving_index, affines, mask, rows, cols, height, width, rho, mean):
    """Normalised cross-correlation of every patch in every frame pair, after in-plane compensation.

    For pair m and patch p the fixed patch is ``frames[fixed_index[m]][rows[p]:rows[p]+height,
    cols[p]:cols[p]+width]``; the moving frame ``frames[moving_index[m]]`` is sampled bilinearly at
    ``(u', v') = A_m · (u, v, 1)`` for each fixed pixel (u = column, v = row), ``A_m = affines[m]``
    (2, 3). ``rho[m, p]`` is the Pearson correlation of the two sets of values and ``mean[m, p]`` the
    fixed patch's mean. ``rho`` is NaN when a corner of the mapped patch falls outside the image or
    ``mask`` (nearest pixel), or a patch is constant.

    Parameters
    ----------
    frames : (n, H, W) uint8 or float array
    fixed_index, moving_index : (M,) int64
    affines : (M, 2, 3) float64
    mask : (H, W) bool
        Valid pixels of the moving frame (the imaged fan; patches are a few mm, so checking the
        corners of the mapped patch suffices).
    rows, cols : (P,) int64
        Top-left pixel of each patch; the fixed patch must lie inside the image.
    height, width : int
        Patch size in pixels (>= 2).
    rho, mean : (M, P) float64
        Outputs.
    """
    n_patches = rows.shape[0]
    img_h = frames.shape[1]
    img_w = frames.shape[2]
    npix = height * width
    for k in prange(fixed_index.shape[0] * n_patches):
        m = k // n_patches
        p = k - m * n_patches
        fi = fixed_index[m]
        gi = moving_index[m]
        a00, a01, a02 = affines[m, 0, 0], affines[m, 0, 1], affines[m, 0, 2]
        a10, a11, a12 = affines[m, 1, 0], affines[m, 1, 1], affines[m, 1, 2]
        r0 = rows[p]
        c0 = cols[p]
        r1 = r0 + height - 1
        c1 = c0 + width - 1
        inside = (
            _sample_ok(a00 * c0 + a01 * r0 + a02, a10 * c0 + a11 * r0 + a12, mask)
            and _sample_ok(a00 * c1 + a01 * r0 + a02, a10 * c1 + a11 * r0 + a12, mask)
            and _sample_ok(a00 * c0 + a01 * r1 + a02, a10 * c0 + a11 * r1 + a12, mask)
            and _sample_ok(a00 * c1 + a01 * r1 + a02, a10 * c1 + a11 * r1 + a12, mask)
        )
        sf = 0.0
        sg = 0.0
        sff = 0.0
        sgg = 0.0
        sfg = 0.0
        for r in range(r0, r0 + height):
            # the sample position moves by (a00, a10) per column: no multiply in the inner loop
            u = a00 * c0 + a01 * r + a02
            v = a10 * c0 + a11 * r + a12
            for c in range(c0, c0 + width):
                fv = float(frames[fi, r, c])
                sf += fv
                sff += fv * fv
                if inside:
                    iu = min(max(int(u), 0), img_w - 2)
                    iv = min(max(int(v), 0), img_h - 2)
                    du = u - iu
                    dv = v - iv
                    g00 = float(frames[gi, iv, iu])
                    g01 = float(frames[gi, iv, iu + 1])
                    g10 = float(frames[gi, iv + 1, iu])
                    g11 = float(frames[gi, iv + 1, iu + 1])
                    top = g00 + du * (g01 - g00)
                    gv = top + dv * (g10 + du * (g11 - g10) - top)
                    sg += gv
                    sgg += gv * gv
                    sfg += fv * gv
                u += a00
                v += a10
        mean[m, p] = sf / npix
        vf = sff - sf * sf / npix
        vg = sgg - sg * sg / npix
        if not inside or vf <= 1e-9 * npix or vg <= 1e-9 * npix:  # outside, or constant up to rounding
            rho[m, p] = np.nan
        else:
            rho[m, p] = (sfg - sf * sg / npix) / math.sqrt(vf * vg)
