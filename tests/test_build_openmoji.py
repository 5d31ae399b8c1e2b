"""data_scripts/build_openmoji.py on a tiny fake OpenMoji package (same layout and CSV columns as the npm tarball)."""

import csv
import importlib.util
import json
import os
import re
import tarfile

import pytest
from PIL import Image

try:  # pytest.importorskip("cairosvg"), also when cairocffi finds no system cairo library (OSError)
    import cairosvg  # noqa: F401
except (ImportError, OSError) as _err:
    if os.environ.get("CI"):  # CI installs the extra and cairo: there a missing renderer is a failure
        raise
    pytest.skip(f"cairosvg unavailable ({_err}): pip install -e \".[openmoji]\"", allow_module_level=True)

from vit_t5_dsi.data.collection import load_karpathy  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("build_openmoji", os.path.join(ROOT, "data_scripts",
                                                                               "build_openmoji.py"))
build_openmoji = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_openmoji)

COLUMNS = ["emoji", "hexcode", "group", "subgroups", "annotation", "tags", "openmoji_tags", "openmoji_author",
           "openmoji_date", "skintone", "skintone_combination", "skintone_base_emoji", "skintone_base_hexcode",
           "unicode", "order"]
# hexcode, group, subgroups, annotation, tags, openmoji_tags, skintone, skintone_base_hexcode, SVG fill (None: no SVG)
EMOJI = [
    ("1F600", "smileys-emotion", "face-smiling", "grinning face", "face, grin, happy, smile", "smile", "", "",
     "#FCEA2B"),
    ("1F469-200D-1F4BB", "people-body", "person-role", "woman technologist", "coder, developer, software", "", "", "",
     "#3F3F3F"),
    ("1F469-1F3FB-200D-1F4BB", "people-body", "person-role", "woman technologist: light skin tone", "", "", "1",
     "1F469-200D-1F4BB", "#FADCBC"),
    ("1F469-1F3FE-200D-1F4BB", "people-body", "person-role", "woman technologist: medium-dark skin tone", "", "", "4",
     "1F469-200D-1F4BB", "#A57939"),
    ("1F468-1F3FE-200D-1F4BB", "people-body", "person-role", "man technologist: medium-dark skin tone", "", "", "4",
     "1F468-200D-1F4BB", "#A57930"),
    ("1F41F", "animals-nature", "animal-marine", "fish", "fish, pisces, water", "", "", "", "#92D3F5"),
    ("E001", "extras-openmoji", "animals-nature", "donkey", "", "", "", "", "#9B9B9A"),
    ("1F1E9-1F1EA", "flags", "country-flag", "flag: Germany", "flag", "", "", "", "#D22F27"),
    ("1F3F8", "activities", "sport", "badminton", "birdie, game, racquet", "", "", "", "#FFFFFF"),
    ("1F4A9", "smileys-emotion", "face-costume", "pile of poo", "dung, poo", "", "", "", None),  # no SVG
    ("1F47B", "smileys-emotion", "face-costume", "ghost", "creature, face", "", "", "", "BROKEN"),  # bad SVG
]
SIZE = 24


def _svg(fill):
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72" width="72" height="72">'
            f'<circle cx="36" cy="36" r="30" fill="{fill}" stroke="#000" stroke-width="2"/></svg>')


def _fake_package(base):
    """base/package/{data/openmoji.csv, color/svg/*.svg, package.json}, like the extracted npm tarball."""
    package = base / "package"
    (package / "data").mkdir(parents=True)
    (package / "color" / "svg").mkdir(parents=True)
    (package / "package.json").write_text(json.dumps({"name": "openmoji", "version": "17.0.0"}))
    with open(package / "data" / "openmoji.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        for order, (hexcode, group, subgroups, annotation, tags, om_tags, tone, base_hex, fill) in enumerate(EMOJI):
            writer.writerow({"emoji": "?", "hexcode": hexcode, "group": group, "subgroups": subgroups,
                             "annotation": annotation, "tags": tags, "openmoji_tags": om_tags,
                             "openmoji_author": "Test", "openmoji_date": "2018-04-18", "skintone": tone,
                             "skintone_combination": "single" if tone else "", "skintone_base_emoji": "",
                             "skintone_base_hexcode": base_hex, "unicode": "1", "order": str(order + 1)})
            if fill == "BROKEN":
                (package / "color" / "svg" / f"{hexcode}.svg").write_text("<svg this is not xml")
            elif fill is not None:
                (package / "color" / "svg" / f"{hexcode}.svg").write_text(_svg(fill))
    return package


def _build(source, out, **kwargs):
    kwargs = {"image_size": SIZE, "heldout_fraction": 0.5, "num_workers": 1, "progress": False, **kwargs}
    return build_openmoji.build(str(source), str(out), **kwargs)


def test_build_openmoji_fake_package(tmp_path):
    package = _fake_package(tmp_path / "src")
    json_path = _build(tmp_path / "src", tmp_path / "out")
    assert json_path == str(tmp_path / "out" / "dataset_openmoji.json")
    data = json.loads(open(json_path, encoding="utf-8").read())
    entries = {e["hexcode"]: e for e in data["images"]}
    # the missing SVG and the broken one are skipped, everything else is there
    assert set(entries) == {e[0] for e in EMOJI} - {"1F4A9", "1F47B"}
    for hexcode, entry in entries.items():
        assert entry["filename"] == f"{hexcode}.png"
        with Image.open(tmp_path / "out" / "images" / entry["filename"]) as image:
            assert image.size == (SIZE, SIZE) and image.mode == "RGB"
            assert image.getpixel((0, 0)) == (255, 255, 255)  # transparent background flattened on white
        captions = [s["raw"] for s in entry["sentences"]]
        assert len(captions) >= 2 and len(set(captions)) == len(captions)
    assert not os.path.exists(tmp_path / "out" / "images" / "1F4A9.png")
    # skin-tone and gender variants are told apart by their words: no caption is shared, every caption keeps them
    variants = ["1F469-200D-1F4BB", "1F469-1F3FB-200D-1F4BB", "1F469-1F3FE-200D-1F4BB", "1F468-1F3FE-200D-1F4BB"]
    caption_sets = [{s["raw"] for s in entries[h]["sentences"]} for h in variants]
    for i in range(len(caption_sets)):
        for j in range(i + 1, len(caption_sets)):
            assert not caption_sets[i] & caption_sets[j]
    for captions, gender, other in ((caption_sets[2], "woman", "man"), (caption_sets[3], "man", "woman")):
        for caption in captions:
            words = re.findall(r"[\w-]+", caption)
            assert "medium-dark" in words and gender in words and other not in words, caption
    # a skin-tone variant without tags borrows its base emoji's tags
    assert any("developer" in c or "coder" in c or "software" in c for c in caption_sets[1])
    # held-out images present (by hexcode hash), and the project's loader reads the result
    assert {e["split"] for e in data["images"]} >= {"train"} and any(e["split"] in ("test", "val")
                                                                     for e in data["images"])
    collection = load_karpathy(json_path, str(tmp_path / "out" / "images"))
    assert len(collection) == len(entries)
    assert len(collection.captions) == sum(len(e["sentences"]) for e in data["images"])
    # the licence's credit is written beside the images
    attribution = (tmp_path / "out" / "ATTRIBUTION.txt").read_text(encoding="utf-8")
    assert "All emojis designed by OpenMoji" in attribution and "CC BY-SA 4.0" in attribution
    assert "17.0.0" in attribution

    # deterministic: a second build (from the tarball this time) gives the same JSON and the same PNG bytes
    tarball = tmp_path / "openmoji-17.0.0.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(package, arcname="package")
    again = _build(tarball, tmp_path / "out2")
    assert open(again, "rb").read() == open(json_path, "rb").read()
    for entry in data["images"]:
        first = (tmp_path / "out" / "images" / entry["filename"]).read_bytes()
        assert (tmp_path / "out2" / "images" / entry["filename"]).read_bytes() == first


def test_split_is_about_the_heldout_fraction():
    splits = [build_openmoji.split_for(f"1F{i:04X}", 0.1) for i in range(2000)]
    held = sum(s != "train" for s in splits)
    assert 140 <= held <= 260 and splits.count("test") > 0 and splits.count("val") > 0
    assert splits == [build_openmoji.split_for(f"1F{i:04X}", 0.1) for i in range(2000)]


@pytest.mark.parametrize("kind", ["missing", "empty_dir", "not_a_tarball", "tarball_without_csv"])
def test_bad_source_names_the_path(tmp_path, capsys, kind):
    source = tmp_path / "source"
    if kind == "empty_dir":
        source.mkdir()
    elif kind == "not_a_tarball":
        source.write_text("not an archive")
    elif kind == "tarball_without_csv":
        (tmp_path / "readme.txt").write_text("hello")
        with tarfile.open(source, "w:gz") as tar:
            tar.add(tmp_path / "readme.txt", arcname="package/readme.txt")
    with pytest.raises(build_openmoji.SourceError, match=str(source)):
        _build(source, tmp_path / "out")
    assert build_openmoji.main([str(source), "--output_dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(source) in err and "\n" not in err
    assert not os.path.exists(tmp_path / "out" / "dataset_openmoji.json")
