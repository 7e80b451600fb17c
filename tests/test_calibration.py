import numpy as np
import pytest

from speckle_rec.calibration import (
    DEFAULT_IMAGE_TO_TOOL,
    DEFAULT_PIXEL_TO_MM,
    IMAGE_TO_TOOL_LABEL,
    PIXEL_TO_MM_LABEL,
    Calibration,
    read_calibration,
    write_calibration,
)
from speckle_rec.errors import DataError


def official_layout(scale, calib, extra=""):
    rows = lambda m: "\n".join(",".join(f"{v:.15g}" for v in row) for row in m)  # noqa: E731
    return f"{PIXEL_TO_MM_LABEL}\n{rows(scale)}\n{IMAGE_TO_TOOL_LABEL}\n{rows(calib)}\n{extra}"


def test_reads_official_layout_with_trailing_block(tmp_path):
    path = tmp_path / "calib_matrix.csv"
    extra = "time_difference_between_US_machine_and_NDI_tracker\n0.2s\n"
    path.write_text(official_layout(DEFAULT_PIXEL_TO_MM, DEFAULT_IMAGE_TO_TOOL, extra))
    calib = read_calibration(path)
    np.testing.assert_allclose(calib.pixel_to_mm, DEFAULT_PIXEL_TO_MM, atol=1e-12)
    np.testing.assert_allclose(calib.image_to_tool, DEFAULT_IMAGE_TO_TOOL, atol=1e-12)
    np.testing.assert_allclose(calib.pixel_to_tool, DEFAULT_IMAGE_TO_TOOL @ DEFAULT_PIXEL_TO_MM)
    assert calib.spacing_mm == pytest.approx((0.229389190673828, 0.220979690551758))


def test_round_trip_and_labels_found_anywhere(tmp_path, calibration):
    path = tmp_path / "c.csv"
    write_calibration(path, calibration)
    assert read_calibration(path) == calibration  # repr(float) round-trips exactly
    # blocks in the other order, blank lines and trailing commas are tolerated
    text = official_layout(DEFAULT_PIXEL_TO_MM, DEFAULT_IMAGE_TO_TOOL)
    lines = text.splitlines()
    swapped = "\n".join(lines[5:10] + [""] + [line + "," for line in lines[0:5]])
    path.write_text(swapped)
    np.testing.assert_allclose(read_calibration(path).pixel_to_mm, DEFAULT_PIXEL_TO_MM)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t.replace(PIXEL_TO_MM_LABEL, "scaling"), "label 'scaling_from_pixel_to_mm' not found"),
        (lambda t: "\n".join(t.splitlines()[:8]), "ends after 2 of 4 rows"),
        (lambda t: t.replace("0.229389190673828", "abc", 1), "non-numeric"),
        (lambda t: t.replace("0.231064671309448", "0.5", 1), "not rigid"),
        (lambda t: t.replace(",0,0,0\n", ",0,0\n", 1), "expected 4 comma-separated numbers"),
        (lambda t: t.replace("0.220979690551758", "nan", 1), "NaN or inf"),
    ],
)
def test_malformed_csv(tmp_path, mutate, message):
    text = official_layout(DEFAULT_PIXEL_TO_MM, DEFAULT_IMAGE_TO_TOOL)
    path = tmp_path / "calib_matrix.csv"
    path.write_text(mutate(text))
    with pytest.raises(DataError, match=message) as info:
        read_calibration(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_file_and_bad_scaling(tmp_path):
    with pytest.raises(DataError, match="calibration file not found"):
        read_calibration(tmp_path / "nope.csv")
    scale = DEFAULT_PIXEL_TO_MM.copy()
    scale[0, 1] = 0.1
    path = tmp_path / "c.csv"
    path.write_text(official_layout(scale, DEFAULT_IMAGE_TO_TOOL))
    with pytest.raises(DataError, match="diag"):
        read_calibration(path)


def test_calibration_validates_shape():
    with pytest.raises(DataError, match=r"shape \(4, 4\)"):
        Calibration(np.eye(3), np.eye(4))
