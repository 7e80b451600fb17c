"""The main job end to end: simulate → calibrate → reconstruct → evaluate → plot → volume.

The default run covers every stage on a small scan; `pytest -m slow` runs the README's demo at
full size and checks the reconstruction beats both reference predictions.
"""

import json

import pytest
import SimpleITK as sitk

from cli.main import main


def test_every_stage_on_a_small_scan(tmp_path, capsys):
    from speckle_rec.demo import run_demo

    out = tmp_path / "demo"
    results = run_demo(out, calibration_frames=200, test_frames=160, height=160, width=208, progress=False,
                       log=None)
    methods = results["methods"]
    assert set(methods) == {"speckle_rec", "constant_velocity", "identity"}
    for entry in methods.values():
        assert len(entry["scans"]) == 1 and all(entry["mean"][m] >= 0 for m in ("GPE", "GLE", "LPE", "LLE"))
    assert methods["identity"]["mean"]["score"] == 0.0
    ours = methods["speckle_rec"]["mean"]
    # a working pipeline beats "no motion" on the frame-to-frame errors even on a tiny scan
    assert ours["LPE"] < methods["identity"]["mean"]["LPE"]
    assert (out / "calibration.json").is_file()
    assert len(list((out / "plots").glob("*.png"))) == 1
    volume = sitk.ReadImage(str(out / "volume.mha"))
    assert volume.GetSpacing() == pytest.approx((0.5, 0.5, 0.5))


@pytest.mark.slow
def test_readme_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet", "--json", str(tmp_path / "demo.json")]) == 0
    table = capsys.readouterr().out
    assert "speckle_rec" in table and "constant_velocity" in table and "identity" in table
    results = json.loads((tmp_path / "demo.json").read_text())
    methods = results["methods"]
    ours = methods["speckle_rec"]["mean"]["score"]
    assert ours > methods["constant_velocity"]["mean"]["score"]
    assert ours > 0.2
