"""The bundled atlas: files, provenance, and the 31-label -> 10-region mapping."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from inference.atlas import bundle
from inference.vocabulary import REGIONS, region_by_key


def test_bundle_has_data_licences_and_provenance():
    for name in ("scct.nii.gz", "scct_stripped.nii.gz", "scgrey.nii.gz", "scwhite.nii.gz", "sccsf.nii.gz",
                 "blast_lobar_atlas.nii.gz", "LICENSE.rorden-ct-template", "LICENSE.blast-ct", "NOTICE",
                 "mapping.json", "metadata.json"):
        assert (bundle.DATA / name).is_file(), name
    meta = bundle.metadata()
    for part in ("template", "atlas"):
        assert meta[part]["commit"] and meta[part]["citation"] and meta[part]["source"].startswith("https://")
    assert meta["alignment"]["mask_dice_aligned"] > meta["alignment"]["mask_dice_headers"]


def test_mapping_covers_every_label_with_known_regions():
    table = bundle.load_mapping()
    assert table.shape == (32,) and table[0] == 0
    names = json.loads(bundle.MAPPING_FILE.read_text())["labels"]
    for label, entry in names.items():
        value = table[int(label)]
        name = entry["name"].lower()
        if name == "ventricle":
            assert value == 0
            continue
        region = REGIONS[value - 1]
        if name.startswith(("left", "right")):
            side = "left" if name.startswith("left") else "right"
            assert region.laterality == side or region.key == "cerebellum", entry
        for lobe in ("frontal", "parietal", "occipital", "temporal"):
            if f"{lobe}lobe" in name:
                assert region.structure == f"{lobe} lobe", entry
    assert set(table[1:]) == {r.value for r in REGIONS} | {0}
    assert table[11] == region_by_key("left_temporal_lobe").value  # hippocampus: medial temporal


def test_mapping_errors_name_the_problem(tmp_path):
    labels = {str(k): {"name": f"L{k}", "region": "brainstem"} for k in range(1, 31)}
    path = tmp_path / "mapping.json"
    path.write_text(json.dumps({"labels": labels}))
    with pytest.raises(ValueError, match=r"\[31\] are not mapped"):
        bundle.load_mapping(path)
    labels["31"] = {"name": "x", "region": "left_insula"}
    path.write_text(json.dumps({"labels": labels}))
    with pytest.raises(KeyError, match="unknown region key 'left_insula'"):
        bundle.load_mapping(path)
    labels["31"] = {"name": "x", "region": None}
    labels["40"] = {"name": "y", "region": None}
    path.write_text(json.dumps({"labels": labels}))
    with pytest.raises(ValueError, match="outside 1..31"):
        bundle.load_mapping(path)


def test_region_atlas_is_anatomical_in_template_space():
    atlas = bundle.region_atlas()
    template = bundle.load_template()
    assert atlas.GetPixelID() == sitk.sitkUInt8
    values = sitk.GetArrayViewFromImage(atlas)
    matrix = np.reshape(atlas.GetDirection(), (3, 3)) @ np.diag(atlas.GetSpacing())

    def centroid(key):  # physical LPS (mm): +x left, +y posterior, +z superior
        index = np.argwhere(values == region_by_key(key).value)[:, ::-1].mean(axis=0)
        return matrix @ index + np.asarray(atlas.GetOrigin())

    assert centroid("left_frontal_lobe")[0] > 0 > centroid("right_frontal_lobe")[0]
    assert centroid("left_occipital_lobe")[1] > centroid("left_parietal_lobe")[1] > centroid("left_frontal_lobe")[1]
    assert centroid("left_temporal_lobe")[2] < centroid("left_parietal_lobe")[2]
    assert centroid("cerebellum")[2] < centroid("left_occipital_lobe")[2]
    # The atlas lies inside the template's head.
    inside = sitk.Resample(template, atlas, sitk.Transform(), sitk.sitkLinear, 0.0)
    assert np.percentile(sitk.GetArrayViewFromImage(inside)[values > 0], 5) > 500
