"""Geometry of the simulated curvilinear probe (like the BK 4DC7-3/40 of the challenge data).

Conventions shared by every part of the simulator:

- Image-mm coordinates are the contract's: a 1-based pixel (x = column, y = row) sits at
  (sx·x, sy·y, 0) mm; x along columns, y along rows (downwards = depth), z = image normal.
- World (tissue, and the simulated tracker's camera) coordinates in mm: X along the forearm
  (elbow → wrist), Y across it, Z into the tissue, skin at Z = 0.
- A probe pose is ``image_to_world`` (4x4, image-mm → world). The simulated tracker records
  ``tforms[k] = image_to_world[k] · image_to_tool⁻¹`` (tool → camera), so the contract's formulas
  give back ``frame_to_first = image_to_world[0]⁻¹ · image_to_world[k]`` exactly.
"""

import math
from dataclasses import dataclass

import numpy as np

from ..calibration import DEFAULT_PIXEL_TO_MM

DEFAULT_SPACING_MM = (float(DEFAULT_PIXEL_TO_MM[0, 0]), float(DEFAULT_PIXEL_TO_MM[1, 1]))


@dataclass(frozen=True)
class Probe:
    """A curvilinear probe imaging into a ``height`` x ``width`` pixel grid.

    The transducer face is an arc of ``radius_mm`` about the apex; beams leave it radially and image
    ``depth_mm`` below the face, over ±``half_angle_rad``. The centre of the face touches the skin
    at row ``face_row`` (1-based, may be fractional) in the middle column.
    """

    height: int = 480
    width: int = 640
    spacing_mm: tuple = DEFAULT_SPACING_MM
    radius_mm: float = 40.0
    depth_mm: float = 90.0
    half_angle_rad: float = math.radians(32.0)
    face_row: float = 10.0
    center_frequency_mhz: float = 6.0
    sound_speed_m_s: float = 1540.0

    @classmethod
    def fit_image(cls, height, width, spacing_mm=DEFAULT_SPACING_MM, **overrides):
        """The default probe scaled so its fan fits a ``height`` x ``width`` image at ``spacing_mm``."""
        sx, sy = (float(v) for v in spacing_mm)
        scale = (height * sy) / (480 * DEFAULT_SPACING_MM[1])
        radius, depth, face_row = 40.0 * scale, 90.0 * scale, 10.0 * height / 480
        outer = radius + depth
        half_width = 0.5 * (width - 1) * sx - 2.0 * scale  # keep a small margin at the sides
        half_angle = min(math.radians(32.0), math.asin(min(1.0, max(0.05, half_width / outer))))
        params = dict(height=int(height), width=int(width), spacing_mm=(sx, sy), radius_mm=radius,
                      depth_mm=depth, half_angle_rad=half_angle, face_row=face_row)
        params.update(overrides)
        return cls(**params)

    @property
    def wavelength_mm(self):
        return self.sound_speed_m_s / (self.center_frequency_mhz * 1e3)

    @property
    def apex_mm(self):
        """(x, y) image-mm of the centre of curvature of the face (above the image)."""
        sx, sy = self.spacing_mm
        return sx * (self.width + 1) / 2.0, sy * self.face_row - self.radius_mm

    @property
    def contact_point_mm(self):
        """Image-mm (x, y, z) of the centre of the face, the point that touches the skin."""
        ax, ay = self.apex_mm
        return np.array([ax, ay + self.radius_mm, 0.0])

    def polar_of_pixels(self):
        """Range from the apex (mm) and beam angle (radians, + towards larger x) of every pixel.

        Returns
        -------
        r, theta : ndarray, shape (height, width), float64
        """
        sx, sy = self.spacing_mm
        ax, ay = self.apex_mm
        x_mm = sx * np.arange(1, self.width + 1)[None, :] - ax
        y_mm = sy * np.arange(1, self.height + 1)[:, None] - ay
        return np.hypot(x_mm, y_mm), np.arctan2(x_mm, y_mm)

    def fan_mask(self):
        """Boolean (height, width) mask of the pixels inside the imaged fan."""
        r, theta = self.polar_of_pixels()
        return (r >= self.radius_mm) & (r <= self.radius_mm + self.depth_mm) & (
            np.abs(theta) <= self.half_angle_rad
        )
