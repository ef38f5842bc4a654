"""The lesion mask: mean > 0.5 without small isolated components (`lesions.lesion_mask`), through `segment`."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from diffseg_engine.cli import app
from diffseg_engine.maps.lesions import DEFAULT_MIN_COMPONENT, lesion_mask

runner = CliRunner()


def _blobs() -> np.ndarray:
    mean = np.zeros((60, 60, 40), np.float32)
    mean[10:30, 10:30, 10:30] = 0.9  # the lesion: 8000 voxels
    mean[50:53, 50:53, 30:33] = 0.7  # far, 27 voxels: 0.34 % of it
    mean[32:38, 10:20, 10:15] = 0.8  # a satellite 2 voxels away, 300 voxels: 3.75 %
    mean[45, 5, 5] = 0.51  # one voxel
    mean[40, 40, 5] = 0.5  # exactly 0.5 is not tumour
    return mean


def test_small_components_are_dropped_relative_to_the_largest():
    res = lesion_mask(_blobs(), (1.0, 1.0, 2.0))
    m = res.mask.astype(bool)
    assert res.mask.dtype == np.uint8
    assert m[10:30, 10:30, 10:30].all() and m[32:38, 10:20, 10:15].all()
    assert not m[50:53, 50:53, 30:33].any() and not m[45, 5, 5] and not m[40, 40, 5]
    assert res.kept_ml == pytest.approx([16.0, 0.6]) and res.removed_ml == pytest.approx([0.054, 0.002])
    assert res.describe() == {"components_kept": 2, "components_removed": 2, "removed_ml": 0.056,
                              "largest_removed_ml": 0.054}
    # 0 keeps every component above 0.5; a higher share drops the satellite too
    assert np.array_equal(lesion_mask(_blobs(), (1, 1, 2), min_component=0).mask, (_blobs() > 0.5).astype(np.uint8))
    assert not lesion_mask(_blobs(), (1, 1, 2), min_component=0.05).mask[32:38, 10:20, 10:15].any()


def test_diagonal_neighbours_are_one_lesion_and_edge_cases():
    mean = np.zeros((20, 20, 20), np.float32)
    mean[5:10, 5:10, 5:10] = 1
    mean[10, 10, 10] = 1  # touches the cube by a corner only: 26-connected, part of it
    mean[15, 15, 15] = 1  # isolated single voxel, 1/126 of the largest: under 2 %
    m = lesion_mask(mean, (1, 1, 1)).mask
    assert m[10, 10, 10] == 1 and m[15, 15, 15] == 0
    assert lesion_mask(np.zeros((4, 4, 4)), (1, 1, 1)).mask.sum() == 0  # empty stays empty
    one = np.zeros((4, 4, 4)); one[1, 1, 1] = 0.9
    assert lesion_mask(one, (1, 1, 1)).mask.sum() == 1  # a lone component is the largest: kept
    assert lesion_mask(mean[:, :, 7], (1, 1)).mask.shape == (20, 20)  # a 2D slice
    with pytest.raises(ValueError):
        lesion_mask(mean, (1, 1, 1), min_component=1.0)


def test_segment_cleans_the_mask_only_records_it_and_treats_it_as_part_of_the_run(shared_data, tiny_model,
                                                                                   tmp_path):
    flair = shared_data / "train/BraTS18_CBICA_ASK/BraTS18_CBICA_ASK_flair.nii.gz"
    args = ["segment", str(flair), "--model", str(tiny_model[1]), "-q", "--steps", "2", "--n", "2"]
    outs = {}
    for share in (0.0, 0.3):
        out = tmp_path / f"s{share}"
        res = runner.invoke(app, [*args, "--out", str(out), "--min-component", str(share)])
        assert res.exit_code == 0, res.output
        outs[share] = out
    def load(share, k):
        return np.asarray(nib.load(str(next(outs[share].glob(f"*_{k}.nii.gz")))).dataobj)
    mean = load(0.0, "mean")
    assert np.array_equal(mean, load(0.3, "mean")) and np.array_equal(load(0.0, "variance"), load(0.3, "variance"))
    assert np.array_equal(load(0.0, "mask"), (mean > 0.5).astype(np.uint8))
    expected = lesion_mask(mean, nib.load(str(flair)).header.get_zooms()[:3], min_component=0.3)
    assert np.array_equal(load(0.3, "mask"), expected.mask)
    prov = {s: json.loads(next(outs[s].glob("*_provenance.json")).read_text()) for s in outs}
    assert prov[0.3]["mask_cleanup"] == {"min_component": 0.3, **expected.describe()}
    assert prov[0.0]["run"]["min_component"] == 0.0 and prov[0.3]["run"]["min_component"] == 0.3
    assert prov[0.3]["lesion"]["lesion_voxels"] == int(expected.mask.sum())
    # the random tiny model marks scattered voxels: the clean-up did remove something here
    assert prov[0.3]["mask_cleanup"]["components_removed"] > 0
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "bad"), "--min-component", "1.5"])
    assert res.exit_code == 2 and "--min-component" in res.output and not (tmp_path / "bad").exists()
    assert DEFAULT_MIN_COMPONENT == 0.02
