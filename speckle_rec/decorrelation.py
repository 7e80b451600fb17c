"""Speckle decorrelation curves: patch correlation ρ ↔ |elevational distance| d, per depth band.

Model, for a patch whose centre is at depth ``y`` (image-mm y, i.e. along the rows), between two
frames whose planes are ``d`` mm apart there, rotated in-plane by θ (about the image normal) and
tilted by α (about the image x axis, i.e. fanning)::

    ρ(d, θ, α) = ρ₀ · exp(−½ θ² / σ_θ²) · exp(−½ α² / σ_α²) · [c + (1 − c) · exp(−½ · (d / σ)^p)]

- ρ₀(y): peak correlation of two frames of the same plane (< 1: electronic noise, interpolation
  after in-plane compensation, quantisation);
- σ(y) (mm): elevational correlation length;
- c(y): correlation floor (coherent or partially developed speckle, finite-patch bias);
- p(y): shape exponent; p = 2 is the Gaussian of Rayleigh speckle intensity, log-compressed
  B-mode decorrelates faster near d = 0 (its curve is (6/π²)·Li2 of the Gaussian), which p < 2
  captures;
- σ_θ(y), σ_α(y) (rad): rotations decorrelate speckle even where the planes meet, because the echo
  phase follows the range from the probe: an in-plane rotation shears range across the lateral
  beam width, a tilt about x shears it across the elevational beam width (the stronger effect).
  A rotation about the image y axis shears laterally only and is ignored. ``inf``: no effect.

Each band holds one set; ρ₀, σ, c, p, s, 1/σ_θ² and 1/σ_α² are interpolated linearly between band
centres (constant beyond the outer centres).

A measured ρ scatters about the curve with standard deviation ``s · (1 − ρ²)`` (the large-sample
spread of a Pearson correlation with ``1/s²`` effective samples); ``s`` is fitted per band. The
inverse :meth:`DecorrelationModel.distance` is used only where the normalised ρ / scale is in
``usable_rho`` (≈ 0.2-0.9), scale = ρ₀ · (rotation factors): above it d is ill-conditioned (flat
curve), below it the noise floor dominates. Its uncertainty is ``s · (1 − ρ²) / |∂ρ/∂d|``.
Averaging inverted distances is biased where many patches fall outside the band (censoring);
fitting in ρ space (:func:`speckle_rec.outofplane.fit_plane_rho`) avoids that.

The curves depend on how ρ is measured: the patch size ``patch_mm`` and the Gaussian pre-smoothing
``smooth_px`` (pixels) applied to both frames, which :mod:`speckle_rec.outofplane` takes from the model.

JSON layout (``speckle_rec.decorrelation`` version 1; ``null`` for an infinite σ_θ / σ_α or an
unknown residual)::

    {"format": "speckle_rec.decorrelation", "version": 1, "description": "...",
     "patch_mm": [w, h], "smooth_px": s, "usable_rho": [lo, hi], "depth_edges_mm": [B + 1],
     "sigma_mm": [B], "floor": [B], "shape": [B], "rho_noise": [B], "peak": [B],
     "rotation_sigma_rad": [B], "tilt_sigma_rad": [B], "residual_mm": [B], "n_samples": [B]}
"""

import json
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy.optimize import least_squares

from .errors import DataError
from .io import read_json

FORMAT = "speckle_rec.decorrelation"
VERSION = 1
DEFAULT_FILE = "default_decorrelation.json"
_MIN_BAND_SAMPLES = 20
_MAX_FLOOR = 0.9
_SHAPE_RANGE = (1.0, 4.0)
_PEAK_MIN = 0.5


def _vector(values, name, length=None, source=None):
    try:
        array = np.asarray(values, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise DataError(f"expected numbers in {name}", source) from None
    if length is not None and array.size != length:
        raise DataError(f"expected {length} values in {name}, got {array.size}", source)
    return array


def _optional_vector(values, name, length, fill):
    """``values`` with ``None`` entries (JSON null) or a missing list replaced by ``fill``."""
    if values is None:
        return np.full(length, fill, dtype=np.float64)
    if isinstance(values, (list, tuple)):
        values = [fill if v is None else v for v in values]
    return _vector(values, name, length)


class BandParameters(NamedTuple):
    """Model parameters at a set of depths (arrays of one shape), with the model evaluated there.

    Obtained from :meth:`DecorrelationModel.parameters`; evaluating through it avoids interpolating
    the bands again in inner loops. Arguments broadcast against the depths.
    """

    sigma: np.ndarray
    floor: np.ndarray
    shape: np.ndarray
    noise: np.ndarray
    peak: np.ndarray
    rotation_precision: np.ndarray  # 1/σ_θ² (1/rad²), 0 without rotation decorrelation
    tilt_precision: np.ndarray  # 1/σ_α² (1/rad²)

    def scale(self, rotation_rad=0.0, tilt_rad=0.0):
        """ρ₀ · exp(−½ θ²/σ_θ²) · exp(−½ α²/σ_α²): the expected correlation at d = 0."""
        theta = np.asarray(rotation_rad, dtype=np.float64)
        alpha = np.asarray(tilt_rad, dtype=np.float64)
        return self.peak * np.exp(-0.5 * (theta**2 * self.rotation_precision + alpha**2 * self.tilt_precision))

    def rho(self, distance_mm, rotation_rad=0.0, tilt_rad=0.0):
        """Expected correlation at |distance| ``distance_mm``, in-plane rotation and tilt."""
        d = np.abs(np.asarray(distance_mm, dtype=np.float64))
        curve = self.floor + (1.0 - self.floor) * np.exp(-0.5 * (d / self.sigma) ** self.shape)
        return curve * self.scale(rotation_rad, tilt_rad)

    def rho_slope(self, distance_mm, rotation_rad=0.0, tilt_rad=0.0):
        """∂ρ/∂|d| (1/mm, ≤ 0)."""
        d = np.maximum(np.abs(np.asarray(distance_mm, dtype=np.float64)), 1e-9 * self.sigma)  # the limit at 0
        u = (d / self.sigma) ** self.shape
        return -(1.0 - self.floor) * np.exp(-0.5 * u) * 0.5 * self.shape * u / d * self.scale(rotation_rad, tilt_rad)


@dataclass(frozen=True)
class DecorrelationModel:
    """Depth-banded decorrelation curves (see the module docstring for the model).

    Attributes
    ----------
    depth_edges_mm : (B + 1,) ndarray
        Increasing band edges in image-mm y.
    sigma_mm : (B,) ndarray
        Elevational correlation length σ per band, mm (> 0).
    floor : (B,) ndarray
        Correlation floor c per band, in [0, 0.9].
    shape : (B,) ndarray
        Shape exponent p per band, in [1, 4] (2: Gaussian).
    rho_noise : (B,) ndarray
        ``s``: a measured ρ has standard deviation ``s · (1 − ρ²)``.
    peak : (B,) ndarray
        ρ₀ per band, in [0.5, 1]. Default all 1.
    rotation_sigma_rad, tilt_sigma_rad : (B,) ndarray
        σ_θ (in-plane rotation) and σ_α (tilt about image x) per band, radians (``inf``: no
        effect, the default).
    usable_rho : (float, float)
        Range of the normalised ρ / scale in which the curve is inverted.
    patch_mm : (float, float)
        Patch (width along x, height along y) the curves were measured with, mm.
    smooth_px : float
        σ (pixels) of the Gaussian smoothing applied to both frames before the correlation (0: none).
    residual_mm : (B,) ndarray
        RMS error of inverted distances per band on the fitting data (NaN if unknown).
    n_samples : (B,) ndarray of int
        Samples per band in the fit (0 if unknown).
    description : str
        Where the curves come from.
    """

    depth_edges_mm: np.ndarray
    sigma_mm: np.ndarray
    floor: np.ndarray
    shape: np.ndarray
    rho_noise: np.ndarray
    peak: np.ndarray = None
    rotation_sigma_rad: np.ndarray = None
    tilt_sigma_rad: np.ndarray = None
    usable_rho: tuple = (0.2, 0.9)
    patch_mm: tuple = (4.0, 4.0)
    smooth_px: float = 1.0
    residual_mm: np.ndarray = None
    n_samples: np.ndarray = None
    description: str = ""

    def __post_init__(self):
        edges = _vector(self.depth_edges_mm, "depth_edges_mm")
        bands = edges.size - 1
        if bands < 1 or not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0):
            raise DataError("expected at least 2 finite increasing depth_edges_mm")
        values = {
            "sigma_mm": _vector(self.sigma_mm, "sigma_mm", bands),
            "floor": _vector(self.floor, "floor", bands),
            "shape": _vector(self.shape, "shape", bands),
            "rho_noise": _vector(self.rho_noise, "rho_noise", bands),
            "peak": _optional_vector(self.peak, "peak", bands, 1.0),
            "rotation_sigma_rad": _optional_vector(self.rotation_sigma_rad, "rotation_sigma_rad", bands, np.inf),
            "tilt_sigma_rad": _optional_vector(self.tilt_sigma_rad, "tilt_sigma_rad", bands, np.inf),
            "residual_mm": _optional_vector(self.residual_mm, "residual_mm", bands, np.nan),
        }
        checks = {
            "sigma_mm": (lambda v: np.isfinite(v) & (v > 0), "positive finite sigma_mm"),
            "floor": (lambda v: (v >= 0) & (v <= _MAX_FLOOR), f"floor in [0, {_MAX_FLOOR}]"),
            "shape": (lambda v: (v >= _SHAPE_RANGE[0]) & (v <= _SHAPE_RANGE[1]),
                      f"shape in [{_SHAPE_RANGE[0]}, {_SHAPE_RANGE[1]}]"),
            "rho_noise": (lambda v: np.isfinite(v) & (v > 0), "positive finite rho_noise"),
            "peak": (lambda v: (v >= _PEAK_MIN) & (v <= 1.0), f"peak in [{_PEAK_MIN}, 1]"),
            "rotation_sigma_rad": (lambda v: v > 0, "positive rotation_sigma_rad (inf for none)"),
            "tilt_sigma_rad": (lambda v: v > 0, "positive tilt_sigma_rad (inf for none)"),
        }
        for name, (ok, what) in checks.items():
            if not np.all(ok(values[name])):
                raise DataError(f"expected {what}")
        count = _optional_vector(self.n_samples, "n_samples", bands, 0).astype(np.int64)
        lo, hi = (float(v) for v in _vector(self.usable_rho, "usable_rho", 2))
        if not 0.0 < lo < hi < 1.0:
            raise DataError(f"expected 0 < usable_rho[0] < usable_rho[1] < 1, got ({lo}, {hi})")
        patch = tuple(float(v) for v in _vector(self.patch_mm, "patch_mm", 2))
        if not (np.all(np.isfinite(patch)) and min(patch) > 0):
            raise DataError(f"expected positive patch_mm, got {patch}")
        smooth = float(self.smooth_px)
        if not (np.isfinite(smooth) and smooth >= 0):
            raise DataError(f"expected smooth_px >= 0, got {smooth}")
        for name, value in dict(values, depth_edges_mm=edges, n_samples=count).items():
            value.setflags(write=False)
            object.__setattr__(self, name, value)
        object.__setattr__(self, "usable_rho", (lo, hi))
        object.__setattr__(self, "patch_mm", patch)
        object.__setattr__(self, "smooth_px", smooth)

    # ------------------------------------------------------------------ evaluation

    @property
    def band_centers_mm(self):
        """(B,) centres of the depth bands, mm."""
        return 0.5 * (self.depth_edges_mm[1:] + self.depth_edges_mm[:-1])

    @property
    def mid_depth_mm(self):
        """Middle of the depth range the bands cover, mm (:meth:`with_sigma_gradient` pivots there)."""
        return 0.5 * (self.depth_edges_mm[0] + self.depth_edges_mm[-1])

    def with_sigma_gradient(self, per_mm):
        """These curves with each band's σ multiplied by ``1 + per_mm · (y − y_mid)``.

        ``y`` is the band's centre and ``y_mid`` the middle of the depth range, so distances at mid
        depth keep their scale. On a sweep, a distance bias that grows linearly with depth reads as
        a steady tilt about image x (``benchmarks/tilt_bias.py``): this trades one for the other.

        Raises
        ------
        DataError
            If a factor is not positive.
        """
        factor = 1.0 + float(per_mm) * (self.band_centers_mm - self.mid_depth_mm)
        if not np.all(factor > 0):
            raise DataError(f"a σ gradient of {per_mm:g} per mm makes σ non-positive over "
                            f"{self.depth_edges_mm[0]:g}-{self.depth_edges_mm[-1]:g} mm")
        return replace(self, sigma_mm=self.sigma_mm * factor)

    def parameters(self, depth_mm):
        """Model parameters at ``depth_mm`` (any shape), interpolated between band centres.

        Returns
        -------
        BandParameters
            ``sigma`` (mm), ``floor``, ``shape``, ``noise`` (s), ``peak`` (ρ₀), ``rotation_precision``
            and ``tilt_precision`` (1/σ², 1/rad²), each shaped like ``depth_mm``.
        """
        depth = np.asarray(depth_mm, dtype=np.float64)
        centers = self.band_centers_mm
        columns = (self.sigma_mm, self.floor, self.shape, self.rho_noise, self.peak,
                   self.rotation_sigma_rad**-2.0, self.tilt_sigma_rad**-2.0)
        return BandParameters(*(np.interp(depth, centers, values) for values in columns))

    def scale(self, depth_mm, rotation_rad=0.0, tilt_rad=0.0):
        """ρ₀ · exp(−½ θ²/σ_θ²) · exp(−½ α²/σ_α²): the expected correlation at d = 0 (broadcast)."""
        return self.parameters(depth_mm).scale(rotation_rad, tilt_rad)

    def rho(self, distance_mm, depth_mm, rotation_rad=0.0, tilt_rad=0.0):
        """Expected correlation at |distance| ``distance_mm``, depth, in-plane rotation and tilt (broadcast)."""
        return self.parameters(depth_mm).rho(distance_mm, rotation_rad, tilt_rad)

    def rho_slope(self, distance_mm, depth_mm, rotation_rad=0.0, tilt_rad=0.0):
        """∂ρ/∂|d| (1/mm, ≤ 0) at ``distance_mm``, depth, rotation and tilt (broadcast)."""
        return self.parameters(depth_mm).rho_slope(distance_mm, rotation_rad, tilt_rad)

    def rho_sigma(self, rho, depth_mm):
        """Standard deviation ``s · (1 − ρ²)`` of a measured correlation whose expectation is ``rho``."""
        r = np.asarray(rho, dtype=np.float64)
        return self.parameters(depth_mm).noise * (1.0 - r**2)

    def distance(self, rho, depth_mm, rotation_rad=0.0, tilt_rad=0.0):
        """Invert measured correlations to |elevational distance| with uncertainty.

        Parameters
        ----------
        rho : array_like
            Measured correlations (NaN allowed).
        depth_mm : array_like
            Patch depths (image-mm y), broadcast against ``rho``.
        rotation_rad, tilt_rad : array_like
            In-plane rotation and tilt about image x between the two frames (radians), broadcast.

        Returns
        -------
        distance_mm, sigma_mm : ndarray
            |d| and its standard deviation (mm); both NaN where the normalised ρ / scale is outside
            ``usable_rho`` or not above the floor.
        """
        r = np.asarray(rho, dtype=np.float64)
        q = self.parameters(depth_mm)
        scale = q.scale(rotation_rad, tilt_rad)
        r, scale, sigma, floor, shape, noise = np.broadcast_arrays(r, scale, q.sigma, q.floor, q.shape, q.noise)
        normalised = r / scale
        lo, hi = self.usable_rho
        g = (normalised - floor) / (1.0 - floor)
        with np.errstate(invalid="ignore"):
            valid = (normalised >= lo) & (normalised <= hi) & (g > 0.0) & (g < 1.0)
        dist = np.full(r.shape, np.nan)
        spread = np.full(r.shape, np.nan)
        u = -2.0 * np.log(g[valid])  # (d/σ)^p
        d = sigma[valid] * u ** (1.0 / shape[valid])
        slope = scale[valid] * (1.0 - floor[valid]) * g[valid] * 0.5 * shape[valid] * u / d
        dist[valid] = d
        spread[valid] = noise[valid] * (1.0 - r[valid] ** 2) / slope
        return dist, spread

    # ------------------------------------------------------------------ fitting

    @classmethod
    def fit(cls, rho, distance_mm, depth_mm, *, rotation_rad=None, tilt_rad=None, bands=6, floor=None,
            shape=None, usable_rho=(0.2, 0.9), patch_mm=(4.0, 4.0), smooth_px=1.0, description=""):
        """Fit the curves to measured (ρ, |d|, depth[, θ, α]) samples, band by band.

        Each band's (ρ₀, σ, c, p[, σ_θ][, σ_α]) is fitted with ``scipy.optimize.least_squares``
        (soft-L1 loss, bounds ρ₀ ∈ [0.5, 1], c ∈ [0, 0.9], p ∈ [1, 4]) on ρ residuals scaled by the
        noise model ``1 − ρ²`` of the previous iteration (plus 0.05 so that samples at d ≈ 0 keep a
        finite weight; three iterations). ``rho_noise`` is then the RMS of the scaled residuals of
        samples whose normalised model ρ is in the usable band, and ``residual_mm`` the RMS error of
        the distances inverted there.

        Parameters
        ----------
        rho : (m,) array_like
            Measured patch correlations.
        distance_mm : (m,) array_like
            True |elevational distance| at each sample (e.g. from a tracked or simulated scan), mm.
        depth_mm : (m,) array_like
            Patch depth (image-mm y) of each sample.
        rotation_rad, tilt_rad : (m,) array_like, optional
            In-plane rotation and tilt about image x of each sample's frame pair; σ_θ (σ_α) is
            fitted when given and not all 0.
        bands : int or (B + 1,) array_like
            Number of equal-width bands over the sample depth range, or the band edges (mm).
        floor : float, optional
            Fix the floor c (e.g. 0 for fully developed speckle); fitted if None.
        shape : float, optional
            Fix the shape exponent p (e.g. 2 for a Gaussian); fitted if None.
        usable_rho, patch_mm, smooth_px, description
            Stored in the model (``patch_mm`` and ``smooth_px`` must describe how ``rho`` was measured).

        Returns
        -------
        DecorrelationModel
            With ``residual_mm`` and ``n_samples`` filled in.

        Raises
        ------
        DataError
            On mismatched inputs, too few finite samples, or a band with fewer than 20 samples.
        """
        r = _vector(rho, "rho")
        d = np.abs(_vector(distance_mm, "distance_mm"))
        y = _vector(depth_mm, "depth_mm")
        theta = np.zeros_like(r) if rotation_rad is None else np.abs(_vector(rotation_rad, "rotation_rad"))
        alpha = np.zeros_like(r) if tilt_rad is None else np.abs(_vector(tilt_rad, "tilt_rad"))
        if not r.size == d.size == y.size == theta.size == alpha.size:
            raise DataError(
                f"expected rho, distance_mm, depth_mm (and rotation_rad, tilt_rad) of equal length, got {r.size},"
                f" {d.size}, {y.size}, {theta.size}, {alpha.size}"
            )
        keep = np.isfinite(r) & np.isfinite(d) & np.isfinite(y) & np.isfinite(theta) & np.isfinite(alpha)
        r, d, y, theta, alpha = r[keep], d[keep], y[keep], theta[keep], alpha[keep]
        if r.size < _MIN_BAND_SAMPLES:
            raise DataError(f"expected at least {_MIN_BAND_SAMPLES} finite samples, got {r.size}")
        if np.ndim(bands) == 0:
            if int(bands) < 1:
                raise DataError(f"expected bands >= 1, got {bands}")
            edges = np.linspace(y.min(), y.max(), int(bands) + 1)
            edges[-1] = np.nextafter(edges[-1], np.inf)
        else:
            edges = _vector(bands, "bands")
        if floor is not None and not 0.0 <= float(floor) <= _MAX_FLOOR:
            raise DataError(f"expected floor in [0, {_MAX_FLOOR}], got {floor}")
        if shape is not None and not _SHAPE_RANGE[0] <= float(shape) <= _SHAPE_RANGE[1]:
            raise DataError(f"expected shape in [{_SHAPE_RANGE[0]}, {_SHAPE_RANGE[1]}], got {shape}")
        index = np.searchsorted(edges, y, side="right") - 1
        n_bands = edges.size - 1
        params = np.empty((n_bands, 6))
        count = np.zeros(n_bands, np.int64)
        for b in range(n_bands):
            sel = index == b
            count[b] = sel.sum()
            if count[b] < _MIN_BAND_SAMPLES:
                raise DataError(
                    f"depth band {b} ({edges[b]:.1f}-{edges[b + 1]:.1f} mm) has {int(count[b])} samples,"
                    f" need {_MIN_BAND_SAMPLES}"
                )
            params[b] = _fit_band(r[sel], d[sel], theta[sel], alpha[sel], floor, shape,
                                  bool(np.any(theta > 0)), bool(np.any(alpha > 0)))
        noise = np.ones(n_bands)
        options = dict(peak=params[:, 3], rotation_sigma_rad=params[:, 4], tilt_sigma_rad=params[:, 5],
                       usable_rho=usable_rho, patch_mm=patch_mm, smooth_px=smooth_px, n_samples=count,
                       description=description)
        provisional = cls(edges, params[:, 0], params[:, 1], params[:, 2], noise, **options)
        lo, hi = provisional.usable_rho
        expected = provisional.rho(d, y, theta, alpha)
        normalised = expected / provisional.scale(y, theta, alpha)
        for b in range(n_bands):
            sel = index == b
            usable = sel & (normalised >= lo) & (normalised <= hi)
            scaled = ((r - expected) / (1.0 - expected**2))[usable if usable.any() else sel]
            noise[b] = max(float(np.sqrt(np.mean(scaled**2))), 1e-6)
        model = cls(edges, params[:, 0], params[:, 1], params[:, 2], noise, **options)
        estimate, _ = model.distance(r, y, theta, alpha)
        residual = np.full(n_bands, np.nan)
        for b in range(n_bands):
            sel = (index == b) & np.isfinite(estimate)
            if sel.any():
                residual[b] = np.sqrt(np.mean((estimate[sel] - d[sel]) ** 2))
        return replace(model, residual_mm=residual)

    # ------------------------------------------------------------------ files

    def to_dict(self):
        """JSON-ready dict (see the module docstring)."""

        def finite_or_none(values):
            return [float(v) if np.isfinite(v) else None for v in values]

        return {
            "format": FORMAT,
            "version": VERSION,
            "description": self.description,
            "patch_mm": list(self.patch_mm),
            "smooth_px": self.smooth_px,
            "usable_rho": list(self.usable_rho),
            "depth_edges_mm": self.depth_edges_mm.tolist(),
            "sigma_mm": self.sigma_mm.tolist(),
            "floor": self.floor.tolist(),
            "shape": self.shape.tolist(),
            "rho_noise": self.rho_noise.tolist(),
            "peak": self.peak.tolist(),
            "rotation_sigma_rad": finite_or_none(self.rotation_sigma_rad),
            "tilt_sigma_rad": finite_or_none(self.tilt_sigma_rad),
            "residual_mm": finite_or_none(self.residual_mm),
            "n_samples": self.n_samples.tolist(),
        }

    @classmethod
    def from_dict(cls, data, *, source=None):
        """Build from :meth:`to_dict` output; ``source`` names the file in error messages."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DataError(f"not a {FORMAT} file", source)
        if data.get("version") != VERSION:
            raise DataError(f"unsupported {FORMAT} version {data.get('version')!r} (expected {VERSION})", source)
        missing = [k for k in ("depth_edges_mm", "sigma_mm", "floor", "shape", "rho_noise") if k not in data]
        if missing:
            raise DataError(f"missing key '{missing[0]}'", source)
        try:
            return cls(
                data["depth_edges_mm"], data["sigma_mm"], data["floor"], data["shape"], data["rho_noise"],
                peak=data.get("peak"), rotation_sigma_rad=data.get("rotation_sigma_rad"),
                tilt_sigma_rad=data.get("tilt_sigma_rad"),
                usable_rho=tuple(data.get("usable_rho", (0.2, 0.9))),
                patch_mm=tuple(data.get("patch_mm", (4.0, 4.0))),
                smooth_px=data.get("smooth_px", 1.0),
                residual_mm=data.get("residual_mm"), n_samples=data.get("n_samples"),
                description=str(data.get("description", "")),
            )
        except (DataError, TypeError) as exc:
            raise DataError(getattr(exc, "problem", str(exc)), source) from None

    def to_json(self, path):
        """Write the model to ``path`` (JSON)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path):
        """Read a model written by :meth:`to_json`."""
        return cls.from_dict(read_json(path, "decorrelation model file"), source=path)

    @classmethod
    def default(cls):
        """The packaged model matching the simulator's default beam and tissue (``speckle_rec/data``)."""
        resource = resources.files("speckle_rec") / "data" / DEFAULT_FILE
        with resources.as_file(resource) as path:
            return cls.from_json(path)


def _fit_band(r, d, theta, alpha, floor, shape, fit_rotation, fit_tilt):
    """(σ, c, p, ρ₀, σ_θ, σ_α) of one band; c, p fixed when given, σ_θ, σ_α = inf unless fitted."""
    start = (r > 0.2) & (r < 0.95) & (d > 0)
    if start.sum() >= 3:  # Gaussian through the origin: −2 ln ρ = d² / σ²
        sigma0 = np.sqrt(np.sum(d[start] ** 4) / np.sum(d[start] ** 2 * -2.0 * np.log(r[start])))
    else:
        sigma0 = max(float(np.median(d)), 1e-3)
    free = [("sigma", sigma0, 1e-3, 1e3), ("peak", 0.98, _PEAK_MIN, 1.0)]
    if floor is None:
        free.append(("floor", 0.05, 0.0, _MAX_FLOOR))
    if shape is None:
        free.append(("shape", 2.0, *_SHAPE_RANGE))
    if fit_rotation:  # precisions 1/σ² (1/rad²): 0 is no effect, so the bound is natural
        free.append(("rotation", 10.0, 0.0, 1e7))
    if fit_tilt:
        free.append(("tilt", 10.0, 0.0, 1e7))
    fixed = {"floor": floor, "shape": shape, "rotation": 0.0, "tilt": 0.0}

    def unpack(x):
        v = dict(fixed, **{name: value for (name, *_), value in zip(free, x)})
        return v["sigma"], v["floor"], v["shape"], v["peak"], v["rotation"], v["tilt"]

    def model(x):
        sigma, c, p, peak, rotation, tilt = unpack(x)
        scale = peak * np.exp(-0.5 * (rotation * theta**2 + tilt * alpha**2))
        return scale * (c + (1.0 - c) * np.exp(-0.5 * (d / sigma) ** p))

    def residuals(x, spread):
        return (r - model(x)) / spread

    # iteratively reweighted: the noise scale 1 − ρ² is frozen at the previous fit, because letting
    # it follow the parameters biases the curve towards low ρ (where residuals look smaller)
    x = np.array([f[1] for f in free])
    bounds = ([f[2] for f in free], [f[3] for f in free])
    spread = np.ones_like(r)
    for _ in range(3):
        x = least_squares(residuals, x, args=(spread,), bounds=bounds, loss="soft_l1", f_scale=0.5).x
        spread = 1.05 - model(x) ** 2
    sigma, c, p, peak, rotation, tilt = unpack(x)
    return (sigma, c, p, peak, 1.0 / np.sqrt(rotation) if rotation > 0 else np.inf,
            1.0 / np.sqrt(tilt) if tilt > 0 else np.inf)
