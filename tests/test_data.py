"""Image loading: the bundle, ImageFolder trees, zips, and their error paths."""
import zipfile

import numpy as np
import pytest
from PIL import Image

from intsim.data import BUNDLE, Transform, load_images
from intsim.errors import UserError


def _img(path, color=(10, 20, 30), size=(40, 30)):
    Image.new("RGB", size, color).save(path)


def test_bundle_is_balanced_and_small():
    assert BUNDLE.stat().st_size < 10e6
    s = load_images(None, Transform(32), 200)
    assert s.images.shape == (200, 3, 32, 32) and s.images.dtype == np.uint8
    assert np.bincount(s.labels, minlength=10).tolist() == [20] * 10
    c = load_images(None, Transform(32), 32, split="calib")
    assert np.bincount(c.labels, minlength=10).min() >= 3
    assert not set(s.ids) & set(c.ids)


def test_transform_resizes_and_crops():
    s = load_images(None, Transform(224, crop_pct=0.875), 2)
    assert s.images.shape == (2, 3, 224, 224)


def test_imagefolder_tree(tmp_path):
    for c in ("b_cls", "a_cls"):
        (tmp_path / c).mkdir()
        for i in range(3):
            _img(tmp_path / c / f"{i}.png", color=(i, 0, 0))
    s = load_images(tmp_path, Transform(16), None)
    assert s.classes == ["a_cls", "b_cls"] and len(s) == 6
    assert sorted(s.labels.tolist()) == [0, 0, 0, 1, 1, 1]


def test_zip_of_tree(tmp_path):
    (tmp_path / "x").mkdir()
    _img(tmp_path / "x" / "0.jpg")
    zp = tmp_path / "d.zip"
    with zipfile.ZipFile(zp, "w") as z:
        z.write(tmp_path / "x" / "0.jpg", "x/0.jpg")
    s = load_images(zp, Transform(8), None)
    assert s.images.shape == (1, 3, 8, 8)


@pytest.mark.parametrize("case", ["empty", "no_classes", "not_image", "missing", "bad_zip", "corrupt_image"])
def test_data_errors(tmp_path, case):
    d = tmp_path / "data"
    d.mkdir()
    if case == "no_classes":
        _img(d / "loose.png")
    elif case == "empty":
        (d / "cls").mkdir()
    elif case == "not_image":
        (d / "cls").mkdir()
        _img(d / "cls" / "0.png")
        (d / "cls" / "notes.txt").write_text("hello")
    elif case == "missing":
        d = tmp_path / "nope"
    elif case == "bad_zip":
        d = tmp_path / "x.zip"
        d.write_bytes(b"not a zip")
    elif case == "corrupt_image":
        (d / "cls").mkdir()
        (d / "cls" / "0.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(UserError) as e:
        load_images(d, Transform(8), None)
    msg = str(e.value)
    if case == "not_image":
        assert "notes.txt" in msg
    if case == "corrupt_image":
        assert "0.jpg" in msg


def test_streamed_evaluation_equals_whole_array():
    """evaluate_stream over small chunks gives the same logits, counts and image counts as one call
    on the whole array, and runs a limited level (the golden model) on the prefix only."""
    from intsim import evaluate as ev
    from intsim.data import Transform, open_images
    from intsim.engine import Engine
    from intsim.studies.random_program import make_program
    from reference.golden import run as golden_run

    prog = make_program(3, img=32)
    stream = open_images(None, Transform(32), 23, split="eval")
    whole = stream.read().images
    eng = Engine(prog)
    scale = 1.0
    levels = {"engine": lambda x: ev.run_integer(lambda y: eng.run(y), x, scale, 4, "engine", False),
              "golden": lambda x: ev.run_integer(lambda y: golden_run(prog, y), x, scale, 4, "golden", False)}
    got = ev.evaluate_stream(stream, levels, chunk=5, limits={"golden": 12})
    ref = levels["engine"](whole)
    assert np.array_equal(got.levels["engine"].int_logits, ref.int_logits)
    assert got.levels["engine"].counts == ref.counts and got.levels["engine"].images == 23
    assert got.levels["golden"].images == 12
    assert np.array_equal(got.levels["golden"].int_logits, ref.int_logits[:12])
