"""KITTI reader: parsing, precise errors (file + line), splits, orphans. Fixtures are written to tmp_path."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from aidkd.data import (
    KITTI_CLASSES,
    DatasetError,
    format_kitti_line,
    load_kitti_records,
    parse_kitti_label_file,
    parse_kitti_line,
    read_split_file,
    scan_kitti,
    split_stems,
)

HYP = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

CAR = "Car 0.00 0 -1.58 587.01 173.33 614.12 200.12 1.65 1.67 3.64 -0.65 1.71 46.70 -1.59"
PED = "Pedestrian 0.00 0 -0.20 712.40 143.00 810.73 307.92 1.89 0.48 1.20 1.84 1.47 8.41 0.01"
DONTCARE = "DontCare -1 -1 -10 503.89 169.71 590.61 190.13 -1 -1 -1 -1000 -1000 -1000 -10"


def write_png(path: Path, w: int = 40, h: int = 20, seed: int = 0) -> None:
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_kitti(root: Path, frames: dict[str, str], size=(40, 20), images=None) -> Path:
    """frames: stem -> label text. ``images``: stems that get an image (default: all)."""
    (root / "training" / "label_2").mkdir(parents=True, exist_ok=True)
    (root / "training" / "image_2").mkdir(parents=True, exist_ok=True)
    for stem, text in frames.items():
        (root / "training" / "label_2" / f"{stem}.txt").write_text(text)
    for stem in (frames if images is None else images):
        write_png(root / "training" / "image_2" / f"{stem}.png", *size)
    return root


# ------------------------------------------------------------------------------------------------ parsing
def test_parse_line_values():
    o = parse_kitti_line(CAR)
    assert o.cls == "Car"
    assert o.box == (587.01, 173.33, 614.12, 200.12)
    assert o.truncated == 0.0 and o.occluded == 0 and o.alpha == -1.58
    assert o.extra == (1.65, 1.67, 3.64, -0.65, 1.71, 46.70, -1.59)
    assert o.score is None and not o.iscrowd
    d = parse_kitti_line(DONTCARE)
    assert d.cls == "DontCare" and d.truncated == -1.0 and d.occluded == -1 and d.alpha == -10.0


def test_parse_file_lines_and_empty(tmp_path):
    p = tmp_path / "000001.txt"
    p.write_text(CAR + "\n" + PED + "\r\n\n" + DONTCARE + "\n")
    objs = parse_kitti_label_file(p)
    assert [o.cls for o in objs] == ["Car", "Pedestrian", "DontCare"]
    assert [o.line for o in objs] == [1, 2, 4]
    empty = tmp_path / "000002.txt"
    empty.write_text("")
    assert parse_kitti_label_file(empty) == []


def test_score_field_only_with_flag(tmp_path):
    p = tmp_path / "pred.txt"
    p.write_text(CAR + " 0.8731\n")
    assert parse_kitti_label_file(p, with_score=True)[0].score == pytest.approx(0.8731)
    with pytest.raises(DatasetError) as e:
        parse_kitti_label_file(p)
    assert e.value.line == 1 and "expected 15 fields, got 16" in str(e.value)
    assert str(e.value).startswith(f"{p}:1: ")


def test_format_round_trip():
    o = parse_kitti_line(CAR)
    assert parse_kitti_line(format_kitti_line(o)) == o
    assert parse_kitti_line(format_kitti_line(o, score=0.5), with_score=True).score == 0.5


@pytest.mark.parametrize("line, needle", [
    ("Car 0.00 0 -1.58 587.01 173.33 614.12", "expected 15 fields, got 7"),
    ("Car 0.00 0 -1.58 587.01 abc 614.12 200.12 1.65 1.67 3.64 -0.65 1.71 46.70 -1.59", "field 6 (y1) is not a number: 'abc'"),
    ("Car 0.00 0 -1.58 587.01 173.33 nan 200.12 1.65 1.67 3.64 -0.65 1.71 46.70 -1.59", "field 7 (x2) is not finite"),
    ("Car 0.00 0 -1.58 587.01 173.33 614.12 200.12 inf 1.67 3.64 -0.65 1.71 46.70 -1.59", "field 9 (h) is not finite"),
    ("Car 0.00 0 -1.58 614.12 173.33 587.01 200.12 1.65 1.67 3.64 -0.65 1.71 46.70 -1.59", "inverted or zero-area box"),
    ("Car 0.00 0 -1.58 587.01 173.33 587.01 200.12 1.65 1.67 3.64 -0.65 1.71 46.70 -1.59", "inverted or zero-area box"),
    ("Bus 0.00 0 -1.58 587.01 173.33 614.12 200.12 1.65 1.67 3.64 -0.65 1.71 46.70 -1.59", "unknown class 'Bus'"),
    ("car 0.00 0 -1.58 587.01 173.33 614.12 200.12 1.65 1.67 3.64 -0.65 1.71 46.70 -1.59", "unknown class 'car'"),
    ("Car 1.50 0 -1.58 587.01 173.33 614.12 200.12 1.65 1.67 3.64 -0.65 1.71 46.70 -1.59", "truncated must be in [0, 1]"),
    ("Car 0.00 5 -1.58 587.01 173.33 614.12 200.12 1.65 1.67 3.64 -0.65 1.71 46.70 -1.59", "occluded must be one of"),
    ("Car 0.00 0 -1.58 -5.00 173.33 614.12 200.12 1.65 1.67 3.64 -0.65 1.71 46.70 -1.59", "outside the image"),
])
def test_malformed_line_message_names_file_and_line(tmp_path, line, needle):
    p = tmp_path / "000007.txt"
    p.write_text(CAR + "\n" + PED + "\n" + line + "\n" + CAR + "\n")
    with pytest.raises(DatasetError) as e:
        parse_kitti_label_file(p)
    msg = str(e.value)
    assert e.value.file == str(p) and e.value.line == 3
    assert msg.startswith(f"{p}:3: ")
    assert needle in msg


def test_collect_mode_lists_every_bad_line(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text(CAR + "\nFoo 0 0 0 1 1 2 2 1 1 1 1 1 1 1\n" + CAR + "\nCar 0 0\n")
    errors: list[DatasetError] = []
    objs = parse_kitti_label_file(p, errors=errors)
    assert len(objs) == 2
    assert [e.line for e in errors] == [2, 4]


def test_box_outside_image_with_size_and_tolerance():
    line = "Car 0.00 0 0 10 5 40.9 20.5 1 1 1 1 1 1 1"
    assert parse_kitti_line(line, image_size=(40, 20)) is not None  # within 1 px
    with pytest.raises(DatasetError, match="outside the 40x20 image"):
        parse_kitti_line("Car 0.00 0 0 10 5 41.5 20 1 1 1 1 1 1 1", file="f.txt", line=9, image_size=(40, 20))


def test_non_utf8_names_line(tmp_path):
    p = tmp_path / "000003.txt"
    p.write_bytes((CAR + "\n" + CAR + "\n").encode() + b"Car \xff\xfe 0\n")
    with pytest.raises(DatasetError) as e:
        parse_kitti_label_file(p)
    assert e.value.line == 3 and "not valid UTF-8" in str(e.value) and str(p) in str(e.value)


# ------------------------------------------------------------------------------------------------ hypothesis
finite = st.floats(min_value=-1000, max_value=1000, allow_nan=False, allow_infinity=False)


@st.composite
def valid_line(draw):
    cls = draw(st.sampled_from(KITTI_CLASSES))
    x1 = draw(st.floats(0, 500, allow_nan=False))
    y1 = draw(st.floats(0, 300, allow_nan=False))
    w = draw(st.floats(0.5, 200, allow_nan=False))
    h = draw(st.floats(0.5, 100, allow_nan=False))
    vals = [draw(st.floats(0, 1)), draw(st.integers(0, 3)), draw(finite), x1, y1, x1 + w, y1 + h]
    vals += [draw(finite) for _ in range(7)]
    return [cls] + [f"{v:.2f}" if isinstance(v, float) else str(v) for v in vals]


BAD_TOKENS = ["nan", "NaN", "inf", "-inf", "Infinity", "abc", "1e999", "--1", "0x10", "", "1.2.3"]


@st.composite
def malformed_line(draw):
    toks = draw(valid_line())
    kind = draw(st.sampled_from(["drop", "extra", "inject", "invert", "class"]))
    if kind == "drop":
        k = draw(st.integers(1, 14))
        for _ in range(k):
            toks.pop(draw(st.integers(0, len(toks) - 1)))
    elif kind == "extra":
        toks += ["1.0"] * draw(st.integers(1, 3))
    elif kind == "inject":
        i = draw(st.integers(1, 14))
        tok = draw(st.sampled_from(BAD_TOKENS))
        if tok == "":
            toks.pop(i)  # an empty token is a missing field
        else:
            toks[i] = tok
    elif kind == "invert":
        if draw(st.booleans()):
            toks[4], toks[6] = toks[6], toks[4] if draw(st.booleans()) else toks[6]
        else:
            toks[5], toks[7] = toks[7], toks[5] if draw(st.booleans()) else toks[7]
    else:
        toks[0] = draw(st.from_regex(r"[A-Za-z_0-9]{1,12}", fullmatch=True).filter(lambda s: s not in KITTI_CLASSES))
    return " ".join(toks)


@HYP
@given(before=st.lists(valid_line(), max_size=4), after=st.lists(valid_line(), max_size=3), bad=malformed_line())
def test_hyp_malformed_kitti_line_error_at_right_line(tmp_path, before, after, bad):
    p = tmp_path / "000042.txt"
    lines = [" ".join(t) for t in before] + [bad] + [" ".join(t) for t in after]
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError) as e:
        parse_kitti_label_file(p)
    assert e.value.file == str(p)
    assert e.value.line == len(before) + 1
    assert str(e.value).startswith(f"{p}:{len(before) + 1}: ")


@HYP
@given(before=st.lists(valid_line(), max_size=3), junk=st.binary(max_size=60).filter(lambda b: b"\n" not in b))
def test_hyp_random_bytes_never_crash(tmp_path, before, junk):
    p = tmp_path / "000043.txt"
    p.write_bytes(("\n".join(" ".join(t) for t in before) + ("\n" if before else "")).encode() + junk + b"\n")
    try:
        objs = parse_kitti_label_file(p)
    except DatasetError as e:
        assert e.file == str(p)
        assert e.line == len(before) + 1
    else:
        assert len(objs) in (len(before), len(before) + 1)


@HYP
@given(before=st.lists(valid_line(), max_size=3), bad=st.sampled_from([b"\xff", b"\xc3(", b"\xe2\x82", b"\x80abc"]),
       pos=st.integers(0, 40))
def test_hyp_non_utf8_names_line(tmp_path, before, bad, pos):
    p = tmp_path / "000044.txt"
    line = CAR.encode()
    pos = min(pos, len(line))
    data = ("\n".join(" ".join(t) for t in before) + ("\n" if before else "")).encode()
    data += line[:pos] + bad + line[pos:] + b"\n" + CAR.encode() + b"\n"
    p.write_bytes(data)
    with pytest.raises(DatasetError) as e:
        parse_kitti_label_file(p)
    assert e.value.file == str(p) and e.value.line == len(before) + 1


# ------------------------------------------------------------------------------------------------ splits
def test_split_is_deterministic_80_20():
    stems = [f"{i:06d}" for i in range(101)]
    train, val = split_stems(stems, val_fraction=0.2, seed=0)
    assert (train, val) == split_stems(list(reversed(stems)), val_fraction=0.2, seed=0)
    assert len(train) == 81 and len(val) == 20
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(stems)
    # the documented rule
    order = sorted(stems)
    random.Random(0).shuffle(order)
    assert train == sorted(order[:81]) and val == sorted(order[81:])
    assert split_stems(stems, seed=1) != (train, val)
    t10, v10 = split_stems([f"{i}" for i in range(10)])
    assert (len(t10), len(v10)) == (8, 2)


def test_load_records_default_split(tmp_path):
    frames = {f"{i:06d}": CAR.replace("587.01", "1.00").replace("614.12", "30.00").replace("173.33", "1.00")
              .replace("200.12", "19.00") + "\n" for i in range(10)}
    root = make_kitti(tmp_path / "k", frames)
    train = load_kitti_records(root, "train")
    val = load_kitti_records(root, "val")
    allr = load_kitti_records(root, "all")
    assert len(train) == 8 and len(val) == 2 and len(allr) == 10
    exp_train, exp_val = split_stems(list(frames))
    assert [r.stem for r in train] == exp_train and [r.stem for r in val] == exp_val
    r = allr[3]
    assert r.image_id == 3 and r.stem == "000003" and r.image_path.name == "000003.png"
    assert r.source.endswith("000003.txt") and r.objects[0].box == (1.0, 1.0, 30.0, 19.0)
    assert r.width is None  # filled by validation / read_sizes
    assert load_kitti_records(root, "all", read_sizes=True)[0].width == 40
    # the 'training' folder itself works as root
    assert len(load_kitti_records(root / "training", "all")) == 10


def test_split_files(tmp_path):
    frames = {f"{i:06d}": "" for i in range(6)}
    root = make_kitti(tmp_path / "k", frames)
    (root / "ImageSets").mkdir()
    (root / "ImageSets" / "train.txt").write_text("000000\n000002\n\n000004\n")
    assert [r.stem for r in load_kitti_records(root, "train")] == ["000000", "000002", "000004"]
    # only train.txt: val is the complement
    assert [r.stem for r in load_kitti_records(root, "val")] == ["000001", "000003", "000005"]
    (root / "ImageSets" / "val.txt").write_text("000001\n")
    assert [r.stem for r in load_kitti_records(root, "val")] == ["000001"]
    custom = tmp_path / "mine.txt"
    custom.write_text("000005\n000003\n")
    assert [r.stem for r in load_kitti_records(root, "val", split_file=custom)] == ["000003", "000005"]
    custom.write_text("000005\n000099\n000005\n")
    with pytest.raises(DatasetError) as e:
        load_kitti_records(root, "val", split_file=custom)
    msg = str(e.value)
    assert f"{custom}:2: frame '000099' has neither an image nor a label file" in msg
    assert f"{custom}:3: frame '000005' listed twice" in msg
    with pytest.raises(DatasetError, match="listed twice"):
        read_split_file(custom)


def test_orphans_are_errors(tmp_path):
    root = make_kitti(tmp_path / "k", {"000000": "", "000001": "", "000002": ""}, images=["000000", "000002"])
    write_png(root / "training" / "image_2" / "000003.png")
    with pytest.raises(DatasetError) as e:
        load_kitti_records(root, "all")
    msg = str(e.value)
    assert "2 problems" in msg
    assert f"{root / 'training' / 'label_2' / '000001.txt'}: label file has no image" in msg
    assert f"{root / 'training' / 'image_2' / '000003.png'}: image has no label file" in msg
    errors: list[DatasetError] = []
    recs = load_kitti_records(root, "all", errors=errors)
    assert [r.stem for r in recs] == ["000000", "000002"] and len(errors) == 2


def test_bad_label_leaves_image_out_in_collect_mode(tmp_path):
    root = make_kitti(tmp_path / "k", {"000000": CAR + "\n", "000001": "Car 0 0\n", "000002": ""})
    with pytest.raises(DatasetError) as e:
        load_kitti_records(root, "all")
    assert e.value.line == 1 and e.value.file.endswith("000001.txt")
    errors: list[DatasetError] = []
    assert [r.stem for r in load_kitti_records(root, "all", errors=errors)] == ["000000", "000002"]
    scan = scan_kitti(root)
    assert len(scan.records) == 3 and scan.bad == {1}


def test_not_a_kitti_root(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_kitti_records(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="not a KITTI root"):
        load_kitti_records(tmp_path / "empty")


def test_non_numeric_stems_get_index_ids(tmp_path):
    root = make_kitti(tmp_path / "k", {"b": "", "a": "", "c": ""})
    recs = load_kitti_records(root, "all")
    assert [(r.stem, r.image_id) for r in recs] == [("a", 0), ("b", 1), ("c", 2)]
