"""Tissue and beam models of the speckle simulator.

World coordinates (see ``probe.py``): mm, X along the forearm, Y across it, Z depth, skin at Z = 0,
no tissue at Z < 0. The tissue is never stored as a volume: space is cut into cubic cells of
``Tissue.cell_mm`` and the point scatterers of a cell are drawn from a counter-based hash of the cell
index and ``Tissue.seed`` (see ``_render_kernels.py``), so every pose sees the same tissue.

The default forearm places its features within about ±25 mm of the world origin across the arm (Y)
and at the depths of a real forearm; layers, vessels and the bone extend along the arm (X), so a
trajectory centred near X = Y = 0 at the skin sees all of them.
"""

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError

# Width ratio σ / b between the measured 8-bit B-mode NCC curve exp(-d²/2σ²) and the elevational amplitude
# weight exp(-z²/2b²). For fully developed speckle the intensity correlation is exp(-d²/2b²); log
# compression turns it into (6/π²)·Li2(exp(-d²/2b²)) (the correlation of log-intensity of circular
# Gaussian speckle), whose least-squares Gaussian fit over d ∈ [0, 3σ] has σ = 0.812·b. Scan conversion
# then interpolates neighbouring polar samples of the log image, which pulls the curve back towards the
# intensity correlation: the end-to-end renderer measures σ/b = 0.854 ± 0.005 (mean of 48 fits: seeds
# 1-3, two plane orientations, 10 mm bands at depths 5-85 mm; one band's fit scatters by ±4 %).
SIGMA_PER_WEIGHT_WIDTH = 0.854


def _positive(name, value, *, allow_zero=False):
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise DataError(f"expected a number for {name}, got {value!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise DataError(f"expected {name} {bound}, got {value}")
    return value


def _vector(name, value, *, unit=False):
    try:
        v = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"expected {name} as 3 numbers, got {value!r}") from None
    if v.shape != (3,) or not np.all(np.isfinite(v)):
        raise DataError(f"expected {name} as 3 finite numbers, got {value!r}")
    if unit:
        norm = float(np.linalg.norm(v))
        if norm == 0:
            raise DataError(f"expected a non-zero {name}")
        v = v / norm
    return tuple(float(x) for x in v)


def _gaussian_beam_width(depth_mm, focus_mm, width_focus_mm, growth_mm):
    """width_focus·sqrt(1 + ((depth − focus)/growth)²): a focused Gaussian beam's width vs depth."""
    depth = np.asarray(depth_mm, dtype=np.float64)
    return width_focus_mm * np.sqrt(1.0 + ((depth - focus_mm) / growth_mm) ** 2)


@dataclass(frozen=True)
class Beam:
    """Imaging system: resolution in the three directions, gain, compression and noise.

    Widths follow a focused Gaussian beam, ``w(depth) = w_focus·sqrt(1 + ((depth − focus)/growth)²)``,
    narrowest at the focus and wider near the face and deep. Depths are below the probe face (mm).

    Attributes
    ----------
    focus_depth_mm, sigma_focus_mm, sigma_growth_mm : float
        Elevational focus depth, width ``σ`` of the measured frame-to-frame NCC curve
        ``exp(-d²/2σ²)`` at the focus, and the depth distance over which ``σ`` grows by √2.
    axial_sigma_mm : float
        Gaussian envelope σ of the pulse-echo response in range (≈ 1.5-cycle pulse at 6 MHz as
        displayed at 0.22 mm/pixel).
    lateral_focus_depth_mm, lateral_sigma_focus_mm, lateral_growth_mm : float
        Same for the in-plane (lateral) beam amplitude profile σ.
    attenuation_db_cm_mhz : float
        Tissue attenuation, one way. Time-gain compensation cancels it for the echoes, so it only
        shapes the electronic noise, which the compensation amplifies with depth.
    depth_gain_db_per_cm : float
        Residual brightness slope with depth left by the compensation.
    dynamic_range_db : float
        Log-compression range mapped onto 0..255 (83 dB on the challenge's machine).
    tissue_level_db : float
        Level of the reference tissue's rms echo (``Tissue.reference_layer``) relative to white.
    noise_db : float
        rms electronic noise relative to the reference tissue's rms echo at the face.
    range_step_mm, line_spacing_mm : float
        Sampling of the polar (range, beam angle) grid: range step and beam spacing at the deepest
        range.
    """

    focus_depth_mm: float = 35.0
    sigma_focus_mm: float = 0.8
    sigma_growth_mm: float = 35.0
    axial_sigma_mm: float = 0.2
    lateral_focus_depth_mm: float = 40.0
    lateral_sigma_focus_mm: float = 0.35
    lateral_growth_mm: float = 30.0
    attenuation_db_cm_mhz: float = 0.5
    depth_gain_db_per_cm: float = -0.3
    dynamic_range_db: float = 83.0
    tissue_level_db: float = -50.0
    noise_db: float = -75.0
    range_step_mm: float = 0.1
    line_spacing_mm: float = 0.25

    def __post_init__(self):
        for name in ("sigma_focus_mm", "sigma_growth_mm", "axial_sigma_mm", "lateral_sigma_focus_mm",
                     "lateral_growth_mm", "dynamic_range_db", "range_step_mm", "line_spacing_mm"):
            object.__setattr__(self, name, _positive(name, getattr(self, name)))
        object.__setattr__(self, "attenuation_db_cm_mhz",
                           _positive("attenuation_db_cm_mhz", self.attenuation_db_cm_mhz, allow_zero=True))
        for name in ("focus_depth_mm", "lateral_focus_depth_mm", "depth_gain_db_per_cm", "tissue_level_db",
                     "noise_db"):
            value = float(getattr(self, name))
            if not math.isfinite(value):
                raise DataError(f"expected a finite {name}, got {value}")
            object.__setattr__(self, name, value)
        if self.range_step_mm > self.axial_sigma_mm or self.line_spacing_mm > 2 * self.lateral_sigma_focus_mm:
            raise DataError("expected range_step_mm <= axial_sigma_mm and line_spacing_mm <= 2·lateral_sigma_focus_mm")

    def elevation_sigma_mm(self, depth_mm):
        """Width σ (mm) of the 8-bit frame-to-frame NCC curve ``exp(-d²/2σ²)`` at ``depth_mm``.

        Parameters
        ----------
        depth_mm : array_like
            Depth below the probe face, mm.

        Returns
        -------
        ndarray (or float for a scalar), same shape as ``depth_mm``
        """
        out = _gaussian_beam_width(depth_mm, self.focus_depth_mm, self.sigma_focus_mm, self.sigma_growth_mm)
        return float(out) if out.ndim == 0 else out

    def elevation_weight_width_mm(self, depth_mm):
        """Width b (mm) of the amplitude weight ``exp(-z²/2b²)`` giving that NCC width (σ / 0.854)."""
        return self.elevation_sigma_mm(depth_mm) / SIGMA_PER_WEIGHT_WIDTH

    def lateral_sigma_mm(self, depth_mm):
        """In-plane (lateral) amplitude σ (mm) of the beam at ``depth_mm`` below the face."""
        out = _gaussian_beam_width(depth_mm, self.lateral_focus_depth_mm, self.lateral_sigma_focus_mm,
                                   self.lateral_growth_mm)
        return float(out) if out.ndim == 0 else out


@dataclass(frozen=True)
class Layer:
    """A horizontal slab ``top_mm <= Z < bottom_mm`` of uniform random scatterers.

    ``density_per_mm3`` scatterers per mm³ with rms amplitude ``amplitude`` (linear, relative). A
    resolution cell is ≈ 15.7·σ_axial·σ_lateral·b ≈ 1 mm³ at the focus to 4 mm³ deep (default beam),
    so ≥ 9 /mm³ gives fully developed speckle (≥ 10 scatterers per cell) and a few per mm³ partially
    developed speckle.
    """

    top_mm: float
    bottom_mm: float
    density_per_mm3: float
    amplitude: float
    name: str = ""

    def __post_init__(self):
        top, bottom = float(self.top_mm), float(self.bottom_mm)
        if not (math.isfinite(top) and top >= 0 and bottom > top):
            raise DataError(f"expected layer depths 0 <= top_mm < bottom_mm, got {top}, {bottom}")
        object.__setattr__(self, "top_mm", top)
        object.__setattr__(self, "bottom_mm", bottom)
        object.__setattr__(self, "density_per_mm3", _positive("density_per_mm3", self.density_per_mm3, allow_zero=True))
        object.__setattr__(self, "amplitude", _positive("amplitude", self.amplitude, allow_zero=True))


@dataclass(frozen=True)
class Vessel:
    """An anechoic (scatterer-free) straight tube: axis through ``point_mm`` along ``direction``."""

    point_mm: tuple
    direction: tuple
    radius_mm: float

    def __post_init__(self):
        object.__setattr__(self, "point_mm", _vector("point_mm", self.point_mm))
        object.__setattr__(self, "direction", _vector("direction", self.direction, unit=True))
        object.__setattr__(self, "radius_mm", _positive("radius_mm", self.radius_mm))


@dataclass(frozen=True)
class Bone:
    """A bone shaft: cylinder of ``radius_mm`` about an axis through ``point_mm`` along ``direction``.

    Its upper half-surface (facing the skin) carries ``surface_density_per_mm2`` point reflectors,
    spread over a depth ``roughness_mm`` under the surface, each with a coherent amplitude
    ``amplitude`` plus a random part of rms ``diffuse_amplitude``: where the beam meets the surface at
    normal incidence the coherent parts add in phase (specular echo), at oblique incidence they cancel
    and the diffuse part remains. The inside holds no scatterers, and tissue beyond the first
    intersection of each beam line with the cylinder is attenuated by ``shadow_db`` (acoustic shadow).
    """

    point_mm: tuple
    direction: tuple
    radius_mm: float
    surface_density_per_mm2: float = 10.0
    amplitude: float = 3.0
    diffuse_amplitude: float = 4.0
    shadow_db: float = -35.0
    roughness_mm: float = 0.3

    def __post_init__(self):
        object.__setattr__(self, "point_mm", _vector("point_mm", self.point_mm))
        object.__setattr__(self, "direction", _vector("direction", self.direction, unit=True))
        for name in ("radius_mm", "surface_density_per_mm2"):
            object.__setattr__(self, name, _positive(name, getattr(self, name)))
        for name in ("amplitude", "diffuse_amplitude", "roughness_mm"):
            object.__setattr__(self, name, _positive(name, getattr(self, name), allow_zero=True))
        shadow = float(self.shadow_db)
        if not (math.isfinite(shadow) and shadow <= 0):
            raise DataError(f"expected shadow_db <= 0, got {shadow}")
        object.__setattr__(self, "shadow_db", shadow)


@dataclass(frozen=True)
class Region:
    """An axis-aligned ellipsoid of partially developed speckle overriding the layers inside it.

    Random scatterers at ``density_per_mm3`` with rms ``amplitude`` (few per resolution cell for
    partially developed speckle) plus, if ``lattice_mm`` > 0, a coherent component: a regular cubic
    lattice of spacing ``lattice_mm`` (anchored at the centre) of reflectors of amplitude
    ``lattice_amplitude``.
    """

    center_mm: tuple
    radii_mm: tuple
    density_per_mm3: float
    amplitude: float
    lattice_mm: float = 0.0
    lattice_amplitude: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "center_mm", _vector("center_mm", self.center_mm))
        radii = _vector("radii_mm", self.radii_mm)
        if min(radii) <= 0:
            raise DataError(f"expected positive radii_mm, got {radii}")
        object.__setattr__(self, "radii_mm", radii)
        for name in ("density_per_mm3", "amplitude", "lattice_mm", "lattice_amplitude"):
            object.__setattr__(self, name, _positive(name, getattr(self, name), allow_zero=True))
        if 0 < self.lattice_mm < 0.2:
            raise DataError(f"expected lattice_mm = 0 or >= 0.2, got {self.lattice_mm}")


FOREARM_LAYERS = (
    Layer(0.0, 1.6, 12.0, 1.8, "skin"),  # echogenic dermis
    Layer(1.6, 5.0, 3.0, 0.6, "fat"),  # hypoechoic, few scatterers: partially developed speckle
    Layer(5.0, 5.6, 12.0, 2.0, "fascia"),  # bright line over the muscle
    Layer(5.6, math.inf, 9.0, 1.0, "muscle"),
)
FOREARM_VESSELS = (
    Vessel((0.0, -10.0, 9.0), (1.0, 0.12, 0.02), 1.6),  # radial-artery-like, nearly along the arm
    Vessel((0.0, 4.0, 14.0), (1.0, -0.35, 0.05), 2.8),  # vein crossing at ~20°
    Vessel((0.0, -4.0, 22.0), (0.9, 0.45, -0.12), 2.0),  # deeper, oblique in both directions
)
# top at Z = 29 mm at X = 0 (25–33 mm over X = ±40), drifting across the arm so that a longitudinal
# plane at Y = 0 meets it only towards the elbow (X < -25 mm)
FOREARM_BONE = Bone((0.0, 13.0, 38.0), (1.0, 0.15, 0.1), 9.0)
FOREARM_REGIONS = (
    Region((0.0, -17.0, 14.0), (40.0, 4.0, 2.5), 0.6, 2.5),  # sparse strong scatterers
    Region((0.0, -12.0, 32.0), (30.0, 6.0, 4.0), 3.0, 0.7, lattice_mm=0.9, lattice_amplitude=1.0),
)


@dataclass(frozen=True)
class Tissue:
    """Procedural scattering tissue (see the module docstring for coordinates).

    Attributes
    ----------
    seed : int
        Seeds the scatterers (and, with the frame index, the electronic noise).
    cell_mm : float
        Edge of the cubic cells scatterers are generated in.
    layers : tuple of Layer
        Depth slabs; the last one is the reference tissue whose echo level ``Beam.tissue_level_db``
        sets. Where layers overlap the later one wins; depths outside every layer are empty.
    vessels : tuple of Vessel
    bone : Bone or None
    regions : tuple of Region
        Regions of partially developed speckle; they override the layers (the later region wins)
        but not vessels or the bone.
    """

    seed: int = 0
    cell_mm: float = 1.5
    layers: tuple = FOREARM_LAYERS
    vessels: tuple = FOREARM_VESSELS
    bone: Bone = FOREARM_BONE
    regions: tuple = FOREARM_REGIONS
    reference_layer: int = field(default=-1)

    def __post_init__(self):
        if (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                or not 0 <= self.seed < 2**63):
            raise DataError(f"expected an integer seed in 0..2**63-1, got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "cell_mm", _positive("cell_mm", self.cell_mm))
        for name, kind in (("layers", Layer), ("vessels", Vessel), ("regions", Region)):
            items = tuple(getattr(self, name))
            if not all(isinstance(item, kind) for item in items):
                raise DataError(f"expected {name} as a sequence of {kind.__name__}")
            object.__setattr__(self, name, items)
        if not self.layers:
            raise DataError("expected at least one layer")
        if self.bone is not None and not isinstance(self.bone, Bone):
            raise DataError(f"expected bone as a Bone or None, got {type(self.bone).__name__}")
        if not -len(self.layers) <= self.reference_layer < len(self.layers):
            raise DataError(f"expected reference_layer within the {len(self.layers)} layers, "
                            f"got {self.reference_layer}")
        ref = self.layers[self.reference_layer]
        if ref.density_per_mm3 * ref.amplitude == 0:
            raise DataError("expected a reference layer with non-zero density and amplitude")
        densest = max([layer.density_per_mm3 for layer in self.layers]
                      + [region.density_per_mm3 for region in self.regions])
        if densest * self.cell_mm**3 > 200:
            raise DataError(f"expected at most 200 scatterers per cell, got {densest * self.cell_mm**3:.0f}; "
                            "use a smaller cell_mm")

    @classmethod
    def forearm(cls, seed=0):
        """The default forearm: skin, fat, fascia, muscle, three vessels, a bone shaft at ~29 mm, two
        regions of partially developed speckle (one sparse, one with a coherent lattice)."""
        return cls(seed=seed)

    @classmethod
    def uniform(cls, seed=0, *, density_per_mm3=9.0, amplitude=1.0):
        """Homogeneous fully developed speckle below the skin (no layers, vessels, bone or regions)."""
        return cls(seed=seed, layers=(Layer(0.0, math.inf, density_per_mm3, amplitude, "uniform"),),
                   vessels=(), bone=None, regions=())

    @property
    def reference_intensity(self):
        """density · amplitude² of the reference layer (mean echo intensity per unit resolution volume)."""
        ref = self.layers[self.reference_layer]
        return ref.density_per_mm3 * ref.amplitude**2
