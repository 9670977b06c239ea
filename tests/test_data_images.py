"""Image reading: missing / zero-byte / truncated / corrupt PNG and JPEG always give DatasetError naming the file."""
from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from aidkd.data import DatasetError, check_image, image_to_tensor, read_image, read_image_size

HYP = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def encoded(fmt: str, w: int = 24, h: int = 16, seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("fmt, ext", [("PNG", ".png"), ("JPEG", ".jpg")])
def test_read_valid(tmp_path, fmt, ext):
    p = tmp_path / f"ok{ext}"
    p.write_bytes(encoded(fmt))
    im = read_image(p, verify=True)
    assert im.mode == "RGB" and im.size == (24, 16)
    assert read_image_size(p) == (24, 16)
    t = image_to_tensor(im)
    assert t.shape == (3, 16, 24) and t.dtype.is_floating_point and 0 <= float(t.min()) <= float(t.max()) <= 1


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_other_modes_become_rgb(tmp_path, mode):
    p = tmp_path / "m.png"
    p.write_bytes(encoded("PNG", mode=mode))
    assert read_image(p).mode == "RGB"


def test_missing_and_empty(tmp_path):
    with pytest.raises(DatasetError) as e:
        read_image(tmp_path / "nope.png")
    assert e.value.file == str(tmp_path / "nope.png") and "not found" in str(e.value)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for fn in (read_image, read_image_size):
        with pytest.raises(DatasetError) as e:
            fn(empty)
        assert str(e.value) == f"{empty}: image file is empty (0 bytes)"


def test_size_mismatch(tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(encoded("PNG"))
    with pytest.raises(DatasetError) as e:
        read_image(p, expected_size=(24, 17), source="ann.json")
    assert str(e.value) == f"{p}: image is 24x16 (WxH) but ann.json declares 24x17"
    with pytest.raises(DatasetError):
        read_image_size(p, expected_size=(23, 16))


def test_truncated_end_markers(tmp_path):
    for fmt, cut in (("PNG", 12), ("PNG", 1), ("JPEG", 2), ("JPEG", 1)):
        p = tmp_path / f"t.{fmt.lower()}"
        p.write_bytes(encoded(fmt)[:-cut])
        with pytest.raises(DatasetError, match="truncated") as e:
            read_image(p)
        assert e.value.file == str(p)


@HYP
@given(fmt=st.sampled_from(["PNG", "JPEG"]), frac=st.floats(0.0, 1.0, exclude_max=True), seed=st.integers(0, 3),
       size=st.tuples(st.integers(1, 40), st.integers(1, 30)))
def test_hyp_truncated_images(tmp_path, fmt, frac, seed, size):
    data = encoded(fmt, *size, seed=seed)
    cut = int(len(data) * frac)
    p = tmp_path / ("img.png" if fmt == "PNG" else "img.jpg")
    p.write_bytes(data[:cut])
    with pytest.raises(DatasetError) as e:
        read_image(p)
    assert e.value.file == str(p)
    _, err = check_image(p, decode=True)
    assert isinstance(err, DatasetError) and err.file == str(p)


@HYP
@given(fmt=st.sampled_from(["PNG", "JPEG"]), pos=st.floats(0.0, 1.0, exclude_max=True),
       junk=st.binary(min_size=1, max_size=16))
def test_hyp_corrupt_images_only_dataset_error(tmp_path, fmt, pos, junk):
    data = bytearray(encoded(fmt, seed=1))
    i = int(len(data) * pos)
    data[i:i + len(junk)] = junk
    p = tmp_path / ("c.png" if fmt == "PNG" else "c.jpg")
    p.write_bytes(bytes(data))
    try:  # corrupted JPEG entropy data may still decode (to garbage); PNG CRCs catch it with verify
        read_image(p, verify=True)
    except DatasetError as e:
        assert e.file == str(p)
    try:
        read_image_size(p)
    except DatasetError as e:
        assert e.file == str(p)


def test_not_an_image(tmp_path):
    p = tmp_path / "x.png"
    p.write_text("hello, I am not a PNG")
    with pytest.raises(DatasetError, match="x.png: unreadable image header"):
        read_image_size(p)
    with pytest.raises(DatasetError, match="x.png: corrupt or truncated image"):
        read_image(p)
