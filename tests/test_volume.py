"""Volume compounding: kernels against NumPy, intensities at known mm positions, files, CLI, errors."""

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from cli import commands
from cli.commands_viz import register_plot, register_volume
from cli.main import main
from speckle_rec import _volume_kernels as kernels
from speckle_rec.ddf import PixelGrid, ddfs_from_transforms
from speckle_rec.errors import DataError
from speckle_rec.io import open_dataset
from speckle_rec.prediction import prediction_path, write_prediction
from speckle_rec.transforms import transforms_from_tforms
from speckle_rec.volume import (
    compound_volume,
    corner_pixels,
    corner_points_mm,
    ddf_at_pixels,
    fan_mask,
    rigid_from_displacements,
    scan_poses,
    write_volume,
)

from .conftest import random_rigid

BACKGROUND, BRIGHT = 10, 200


@pytest.fixture
def cli(monkeypatch):
    """``main`` with a registry of just the visual subcommands."""
    monkeypatch.setattr(commands, "REGISTRY", [register_plot, register_volume])
    return main


def elevational_sweep(n_frames, step_mm):
    """frame_to_first (N-1, 4, 4): frame i sits i·step_mm along the image normal."""
    g = np.tile(np.eye(4), (n_frames - 1, 1, 1))
    g[:, 2, 3] = step_mm * np.arange(1, n_frames)
    return g


def line_frames(n_frames, height, width, bright_row):
    frames = np.full((n_frames, height, width), BACKGROUND, dtype=np.uint8)
    frames[:, bright_row - 1] = BRIGHT  # 1-based row
    return frames


# ------------------------------------------------------------------------------------ kernels
def numpy_compound(frames, to_voxel, rows, cols, spacing, shape):
    """The kernels' formula written out: nearest voxel of T·(sx·(c+1), sy·(r+1), 0, 1), mean per voxel."""
    sx, sy = spacing
    q = np.stack([sx * (cols + 1.0), sy * (rows + 1.0), np.zeros(rows.size), np.ones(rows.size)])
    sums, counts = np.zeros(shape), np.zeros(shape)
    for i, t in enumerate(to_voxel):
        uvw = np.floor((t @ q)[:3] + 0.5).astype(np.int64)
        inside = np.all((uvw >= 0) & (uvw < np.array(shape[::-1])[:, None]), axis=0)
        u, v, w = uvw[:, inside]
        np.add.at(sums, (w, v, u), frames[i, rows[inside], cols[inside]])
        np.add.at(counts, (w, v, u), 1)
    return sums, counts


def test_index_and_accumulate_kernels_match_numpy(rng):
    n, h, w, shape = 7, 13, 17, (9, 11, 14)
    frames = rng.integers(0, 256, size=(n, h, w), dtype=np.uint8)
    rows, cols = np.nonzero(rng.random((h, w)) < 0.7)
    to_voxel = random_rigid(rng, n, rotation_deg=40, translation_mm=3)
    to_voxel[:, :3, 3] += 5.0  # some pixels fall outside the grid, most inside
    spacing = (0.37, 0.29)
    expected_sums, expected_counts = numpy_compound(frames, to_voxel, rows, cols, spacing, shape)
    for n_parts in (1, 2, 4):
        index = np.empty((n, rows.size), np.int64)
        part = np.empty((n, rows.size), np.uint8)
        qx, qy = spacing[0] * (cols + 1.0), spacing[1] * (rows + 1.0)
        kernels.voxel_index_kernel(to_voxel, qx, qy, *shape, n_parts - 1, index, part)
        sums, counts = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        pixels = (rows * w + cols).astype(np.int64)
        kernels.accumulate_kernel(frames.reshape(n, -1), pixels, index, part, n_parts, sums.reshape(-1),
                                  counts.reshape(-1))
        assert 0 < (index < 0).mean() < 1
        np.testing.assert_array_equal(counts, expected_counts)
        np.testing.assert_array_equal(sums, expected_sums)


def numpy_fill_pass(volume, flags, region, iteration):
    known = (flags > 0) & (flags <= iteration)
    padded_v = np.pad(np.where(known, volume, 0.0), 1)
    padded_k = np.pad(known.astype(float), 1)
    total, count = np.zeros(volume.shape), np.zeros(volume.shape)
    nz, ny, nx = volume.shape
    for dz in range(3):
        for dy in range(3):
            for dx in range(3):
                total += padded_v[dz : dz + nz, dy : dy + ny, dx : dx + nx]
                count += padded_k[dz : dz + nz, dy : dy + ny, dx : dx + nx]
    fill = (flags == 0) & (region > 0) & (count > 0)
    volume, flags = volume.copy(), flags.copy()
    volume[fill] = total[fill] / count[fill]
    flags[fill] = iteration + 1
    return volume, flags, int(fill.sum())


def test_fill_kernel_matches_numpy(rng):
    shape = (8, 9, 10)
    flags = (rng.random(shape) < 0.15).astype(np.uint8)
    volume = np.where(flags > 0, rng.random(shape) * 255, 0).astype(np.float32)
    region = (rng.random(shape) < 0.8).astype(np.uint8)
    expected_v, expected_f = volume.astype(np.float64), flags
    for iteration in (1, 2, 3):
        expected_v, expected_f, expected_n = numpy_fill_pass(expected_v, expected_f, region, iteration)
        assert kernels.fill_kernel(volume, flags, region, iteration) == expected_n
        np.testing.assert_array_equal(flags, expected_f)
        np.testing.assert_allclose(volume, expected_v, rtol=1e-5)


# ------------------------------------------------------------------------------ known geometry
def test_bright_line_lands_at_its_mm_position_and_file_round_trips(tmp_path):
    """Pixels of 0.5 mm, voxels of 0.5 mm, frames 0.5 mm apart: one pixel per voxel, exactly."""
    n, h, w, row = 9, 16, 24, 6
    frames = line_frames(n, h, w, row)
    volume, origin, voxel = compound_volume(frames, elevational_sweep(n, 0.5), spacing_mm=(0.5, 0.5),
                                            voxel_mm=0.5, mask=np.ones((h, w), bool))
    assert volume.shape == (n, h, w) and volume.dtype == np.float32 and voxel == 0.5
    np.testing.assert_allclose(origin, [0.5, 0.5, 0.0])  # pixel (1, 1) of frame 0
    expected = np.full((n, h, w), BACKGROUND, np.float32)
    # row 6 is at y = 3.0 mm: voxel row (3.0 − 0.5) / 0.5 = 5
    expected[:, 5, :] = BRIGHT
    np.testing.assert_array_equal(volume, expected)
    for suffix in (".mha", ".nrrd"):
        path = tmp_path / f"sweep{suffix}"
        write_volume(path, volume, origin, voxel)
        image = sitk.ReadImage(str(path))
        assert image.GetSpacing() == (0.5, 0.5, 0.5)
        np.testing.assert_allclose(image.GetOrigin(), origin)
        np.testing.assert_allclose(image.GetDirection(), np.eye(3).ravel())
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), volume)
        # the bright line's physical position, read through SimpleITK's index → mm mapping
        assert image.TransformIndexToPhysicalPoint((3, 5, 2)) == pytest.approx((2.0, 3.0, 1.0))


def test_arbitrary_poses_put_a_bright_pixel_at_its_voxel(rng):
    n, h, w, (x0, y0) = 12, 20, 30, (17, 9)
    frames = np.full((n, h, w), BACKGROUND, dtype=np.uint8)
    frames[:, y0 - 1, x0 - 1] = BRIGHT
    g = random_rigid(rng, n - 1, rotation_deg=30, translation_mm=6)
    volume, origin, voxel = compound_volume(frames, g, spacing_mm=(0.5, 0.5), voxel_mm=0.5, fill_mm=0,
                                            mask=np.ones((h, w), bool))
    q = np.array([0.5 * x0, 0.5 * y0, 0.0, 1.0])
    for pose in np.concatenate([np.eye(4)[None], g]):
        x, y, z = np.floor(((pose @ q)[:3] - origin) / voxel + 0.5).astype(int)
        assert volume[z, y, x] > BACKGROUND


def test_gaps_are_filled_inside_the_sweep_only():
    """Frames 1 mm apart at 0.5 mm voxels leave every other slice empty; a far frame stays apart."""
    n, h, w, row = 6, 12, 16, 4
    frames = line_frames(n, h, w, row)
    g = elevational_sweep(n, 1.0)
    g[-1, 2, 3] = 15.0  # the last frame 11 mm beyond the others
    mask = np.ones((h, w), bool)
    kwargs = dict(spacing_mm=(0.5, 0.5), voxel_mm=0.5, mask=mask)
    raw, _, _ = compound_volume(frames, g, fill_mm=0, **kwargs)
    filled, _, _ = compound_volume(frames, g, fill_mm=1.0, **kwargs)
    assert raw.shape == (31, h, w)
    measured = [0, 2, 4, 6, 8, 30]
    gaps = [1, 3, 5, 7]
    np.testing.assert_array_equal(raw[measured].max(axis=(1, 2)), BRIGHT)
    assert not raw[gaps].any() and not raw[9:30].any()
    np.testing.assert_array_equal(filled[measured], raw[measured])
    # a gap voxel takes the mean of its 3x3x3 neighbourhood's measured voxels
    np.testing.assert_allclose(filled[gaps][:, row - 1, 1:-1], (BRIGHT + 2 * BACKGROUND) / 3, rtol=1e-6)
    np.testing.assert_allclose(filled[gaps][:, 0], BACKGROUND)
    # the 11 mm gap is wider than the filling reach: nothing appears there
    assert not filled[9:30].any()


def test_fan_mask_and_h5_frames(tmp_path, rng):
    n, h, w = 10, 30, 40
    rows, cols = np.mgrid[:h, :w]
    fan = rows**2 + (cols - w / 2) ** 2 < 25**2
    frames = (rng.integers(1, 256, size=(n, h, w)) * fan).astype(np.uint8)
    frames[3, fan] = 0  # a dark frame does not shrink the fan
    np.testing.assert_array_equal(fan_mask(frames), fan)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("frames", data=frames, chunks=(1, h, w))
    g = random_rigid(rng, n - 1, rotation_deg=10, translation_mm=2)
    in_memory = compound_volume(frames, g, spacing_mm=(0.3, 0.25), voxel_mm=0.4)
    with h5py.File(tmp_path / "f.h5") as f:
        on_disk = compound_volume(f["frames"], g, spacing_mm=(0.3, 0.25), voxel_mm=0.4, chunk_frames=3)
    np.testing.assert_array_equal(in_memory[0], on_disk[0])
    np.testing.assert_allclose(in_memory[1], on_disk[1])


def test_pixels_outside_the_fan_do_not_contribute():
    """Black columns at the right are outside the fan: the grid stops before them and nothing is 0."""
    n, h, w = 5, 10, 20
    frames = line_frames(n, h, w, 3)
    frames[:, :, 15:] = 0
    volume, origin, _ = compound_volume(frames, elevational_sweep(n, 0.5), spacing_mm=(0.5, 0.5),
                                        voxel_mm=0.5)
    assert volume.shape == (n, h, 15) and volume.min() == BACKGROUND
    np.testing.assert_allclose(origin, [0.5, 0.5, 0.0])


def test_rigid_poses_from_a_ddf(rng):
    grid = PixelGrid(24, 40, (0.23, 0.22))
    g = random_rigid(rng, 5, rotation_deg=20, translation_mm=10)
    gp = ddfs_from_transforms(g, g, np.array([[1, 1, 1]]), grid)[0]
    displacements = ddf_at_pixels(gp, corner_pixels(grid), chunk_frames=2)
    np.testing.assert_allclose(rigid_from_displacements(corner_points_mm(grid), displacements), g, atol=1e-4)


# -------------------------------------------------------------------------------------- errors
def test_memory_refusal_names_the_grid():
    frames = np.ones((3, 64, 64), np.uint8)
    g = elevational_sweep(3, 500.0)  # 1 m of elevation: 64 x 64 x 2001 voxels, 74 MB
    with pytest.raises(DataError) as info:
        compound_volume(frames, g, spacing_mm=(0.5, 0.5), voxel_mm=0.5, max_bytes=10 * 1024**2)
    message = str(info.value)
    assert "\n" not in message and "voxel grid" in message and "--spacing" in message and "GB" in message


def test_bad_inputs():
    frames = np.ones((3, 8, 8), np.uint8)
    with pytest.raises(DataError, match=r"shape \(2, 4, 4\)"):
        compound_volume(frames, elevational_sweep(4, 1.0), spacing_mm=(0.5, 0.5))
    with pytest.raises(DataError, match="positive"):
        compound_volume(frames, elevational_sweep(3, 1.0), spacing_mm=(0.5, 0.5), voxel_mm=0)
    with pytest.raises(DataError, match="mask is empty"):
        compound_volume(frames, elevational_sweep(3, 1.0), spacing_mm=(0.5, 0.5), mask=np.zeros((8, 8), bool))
    with pytest.raises(DataError, match=r"\.mha or \.nrrd"):
        write_volume("vol.nii", np.zeros((2, 2, 2)), (0, 0, 0), 1.0)


# ----------------------------------------------------------------------------------------- CLI
def test_cli_volume_from_truth_prediction_and_ddf_only(train_dir, tmp_path, cli, capsys):
    ds = open_dataset(train_dir)
    scan = ds.scan("000/LH_rotation")
    calib = ds.calibration()
    g, local = transforms_from_tforms(scan.read_tforms(), calib.image_to_tool)
    n, h, w = scan.shape()
    write_prediction(prediction_path(tmp_path / "pred", "000", "LH_rotation"), global_transforms=g)
    grid = PixelGrid.from_calibration(calib, h, w)
    gp, gl, lp, ll = ddfs_from_transforms(g, local, scan.read_landmarks(), grid)
    write_prediction(prediction_path(tmp_path / "ddf", "000", "LH_rotation"), GP=gp, GL=gl, LP=lp, LL=ll)
    np.testing.assert_allclose(scan_poses(scan, calib, pred_dir=tmp_path / "ddf"), g, atol=1e-3)

    out = {}
    for name, extra in (("truth", ["--truth"]), ("pred", ["--pred", str(tmp_path / "pred")])):
        out[name] = tmp_path / f"{name}.nrrd"
        rc = cli(["volume", str(train_dir), *extra, "--scan", "000/LH_rotation", "-o", str(out[name]),
                  "--spacing", "0.4", "--quiet"])
        assert rc == 0
    assert "voxels of 0.4 mm" in capsys.readouterr().err
    truth, pred = (sitk.ReadImage(str(out[k])) for k in ("truth", "pred"))
    assert truth.GetSpacing() == (0.4, 0.4, 0.4) and truth.GetOrigin() == pred.GetOrigin()
    with scan.frames() as frames:
        volume, origin, _ = compound_volume(frames, g, spacing_mm=calib.spacing_mm, voxel_mm=0.4)
    np.testing.assert_allclose(truth.GetOrigin(), origin)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(truth), volume)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(pred), volume)


@pytest.mark.parametrize("args, expected", [
    (["--truth", "--scan", "000/XX_rotation", "-o", "v.mha"], "no scan '000/XX_rotation'"),
    (["--truth", "--scan", "000/LH_rotation", "-o", "v.png"], "expected a volume file ending in .mha or"),
    (["--pred", "nowhere", "--scan", "000/LH_rotation", "-o", "v.mha"], "no prediction for 000/LH_rotation"),
    (["--truth", "--scan", "000/LH_rotation", "-o", "v.mha", "--max-memory-gb", "1e-6"], "--spacing"),
])
def test_cli_volume_errors_are_one_line(train_dir, tmp_path, cli, capsys, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    assert cli(["volume", str(train_dir), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err and err.startswith("speckle-rec volume: error:")


def test_cli_volume_needs_exactly_one_pose_source(train_dir, cli):
    for extra in ([], ["--truth", "--pred", "p"]):
        with pytest.raises(SystemExit) as info:
            cli(["volume", str(train_dir), *extra, "--scan", "000/LH_rotation", "-o", "v.mha"])
        assert info.value.code == 2
