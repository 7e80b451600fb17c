"""The challenge's `calib_matrix.csv`: pixel → image-mm scaling S and image-mm → tool transform C.

See ``tusrec_contract.md`` §2. The file holds two labelled blocks of four rows of four numbers. We
locate the labels rather than trusting line numbers, and validate what we read.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

PIXEL_TO_MM_LABEL = "scaling_from_pixel_to_mm"
IMAGE_TO_TOOL_LABEL = "spatial_calibration_from_image_coordinate_system_to_tracking_tool_coordinate_system"

# Values from the contract (third-party copies of the official file; identical in 2024 and 2025).
DEFAULT_PIXEL_TO_MM = np.diag([0.229389190673828, 0.220979690551758, 1.0, 1.0])
DEFAULT_IMAGE_TO_TOOL = np.array(
    [
        [0.231064671309448, -0.21805203504134, 0.948189025293473, -70.7413291931152],
        [-0.190847036221471, -0.965787272832032, -0.175591436013112, -80.6505661010742],
        [0.954036962825936, -0.140386087807861, -0.264773903381482, -46.1766223907471],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


@dataclass(frozen=True, eq=False)
class Calibration:
    """Probe calibration of one data folder.

    Attributes
    ----------
    pixel_to_mm : ndarray, shape (4, 4), float64
        S: homogeneous 1-based pixel coordinates (x = column, y = row, 0, 1) → image-mm.
    image_to_tool : ndarray, shape (4, 4), float64
        C: image-mm → tracker-tool coordinates (rigid).
    """

    pixel_to_mm: np.ndarray
    image_to_tool: np.ndarray

    def __post_init__(self):
        for name in ("pixel_to_mm", "image_to_tool"):
            value = np.array(getattr(self, name), dtype=np.float64)
            if value.shape != (4, 4) or not np.all(np.isfinite(value)):
                raise DataError(f"expected a finite {name} of shape (4, 4), got shape {value.shape}")
            value.setflags(write=False)
            object.__setattr__(self, name, value)

    def __eq__(self, other):
        return (
            isinstance(other, Calibration)
            and np.array_equal(self.pixel_to_mm, other.pixel_to_mm)
            and np.array_equal(self.image_to_tool, other.image_to_tool)
        )

    __hash__ = None

    @classmethod
    def default(cls):
        """The challenge's calibration (contract §2), used by the simulator unless told otherwise."""
        return cls(DEFAULT_PIXEL_TO_MM, DEFAULT_IMAGE_TO_TOOL)

    @property
    def spacing_mm(self):
        """(sx, sy): mm per pixel along columns (x) and rows (y)."""
        return float(self.pixel_to_mm[0, 0]), float(self.pixel_to_mm[1, 1])

    @property
    def pixel_to_tool(self):
        """C·S: 1-based pixel coordinates → tracker-tool coordinates."""
        return self.image_to_tool @ self.pixel_to_mm


def _numeric_rows(lines, start, path, label):
    rows = []
    for offset in range(1, 5):
        lineno = start + offset
        if lineno >= len(lines):
            raise DataError(f"calibration block '{label}' ends after {offset - 1} of 4 rows", path)
        fields = [f.strip() for f in lines[lineno].split(",")]
        fields = [f for f in fields if f != ""]
        if len(fields) != 4:
            raise DataError(
                f"line {lineno + 1}: expected 4 comma-separated numbers in block '{label}', got {len(fields)}",
                path,
            )
        try:
            rows.append([float(f) for f in fields])
        except ValueError:
            raise DataError(f"line {lineno + 1}: non-numeric value in block '{label}'", path) from None
    return np.array(rows, dtype=np.float64)


def read_calibration(path):
    """Read a challenge ``calib_matrix.csv``.

    Parameters
    ----------
    path : str or Path
        The CSV file.

    Returns
    -------
    Calibration

    Raises
    ------
    DataError
        If the file is missing, a label is absent, a block is short or non-numeric, S is not a
        positive diagonal scaling, or C is not rigid.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError("calibration file not found", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read calibration file ({exc.__class__.__name__})", path) from None
    lines = [line.strip() for line in text.splitlines()]
    labels = [line.split(",")[0].strip() for line in lines]
    blocks = {}
    for label in (PIXEL_TO_MM_LABEL, IMAGE_TO_TOOL_LABEL):
        if label not in labels:
            raise DataError(f"label '{label}' not found", path)
        blocks[label] = _numeric_rows(lines, labels.index(label), path, label)
    scale, image_to_tool = blocks[PIXEL_TO_MM_LABEL], blocks[IMAGE_TO_TOOL_LABEL]
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(image_to_tool))):
        raise DataError("calibration contains NaN or inf", path)
    off_diagonal = scale - np.diag(np.diag(scale))
    if np.any(off_diagonal != 0) or scale[0, 0] <= 0 or scale[1, 1] <= 0 or scale[3, 3] != 1:
        raise DataError("expected pixel-to-mm scaling diag(sx, sy, sz, 1) with sx, sy > 0", path)
    from .transforms import rigid_error

    err = rigid_error(image_to_tool)
    if err > 1e-4:
        raise DataError(f"image-to-tool calibration is not rigid (deviation {err:.2e})", path)
    return Calibration(scale, image_to_tool)


def write_calibration(path, calibration):
    """Write ``calibration`` in the challenge's ``calib_matrix.csv`` layout (two labelled blocks)."""
    lines = [PIXEL_TO_MM_LABEL]
    lines += [",".join(repr(float(v)) for v in row) for row in calibration.pixel_to_mm]
    lines.append(IMAGE_TO_TOOL_LABEL)
    lines += [",".join(repr(float(v)) for v in row) for row in calibration.image_to_tool]
    Path(path).write_text("\n".join(lines) + "\n")
