"""The configured data is checked once: fully decoded on first use, header-only while the run folder's stamp shows
it unchanged, in a process pool; ``data.check`` chooses."""
from __future__ import annotations

import os

import pytest

from aidkd.data import dataset as dataset_mod
from aidkd.data import load_kitti_records
from aidkd.engine import datamodule
from aidkd.engine.config import config_from_dict


@pytest.fixture
def calls(monkeypatch):
    """The ``decode`` flag of every ``check_dataset`` call (``check_configured_data`` imports it at call time)."""
    from aidkd import data

    seen, original = [], data.check_dataset

    def spy(*args, **kwargs):
        seen.append(kwargs.get("decode", True))
        return original(*args, **kwargs)

    monkeypatch.setattr(data, "check_dataset", spy)
    return seen


def _data(root, **extra):
    return config_from_dict({"data": {"format": "kitti", "root": str(root), **extra}}).data


def test_full_check_once_then_headers_until_the_data_changes(synth_root, tmp_path, calls):
    run = tmp_path / "run"
    run.mkdir()
    stamp = datamodule.check_configured_data(_data(synth_root), run_dir=run)
    assert calls == [True] and stamp
    datamodule.write_data_stamp(run, stamp)
    assert datamodule.check_configured_data(_data(synth_root), run_dir=run) is None
    assert calls == [True, False]  # unchanged: headers only
    label = next((synth_root / "training" / "label_2").iterdir())
    st = label.stat()
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert datamodule.check_configured_data(_data(synth_root), run_dir=run) not in (None, stamp)
    assert calls == [True, False, True]  # a file changed: full again
    assert datamodule.check_configured_data(_data(synth_root, check="header"), run_dir=run) is None
    assert datamodule.check_configured_data(_data(synth_root, check="off"), run_dir=run) is None
    assert calls == [True, False, True, False]


def test_a_process_pool_finds_the_same_problems(synth_root, monkeypatch):
    records = load_kitti_records(synth_root, split="all")
    records[3].objects[0].box = (5.0, 5.0, 5.0, 9.0)  # zero width
    monkeypatch.setattr(dataset_mod, "POOL_MIN_RECORDS", 2)
    serial = dataset_mod.validate_records(records, decode=True)
    pooled = dataset_mod.validate_records(records, decode=True, workers=2)
    assert serial and [e.format() for e in pooled] == [e.format() for e in serial]


def test_a_new_run_beside_a_checked_one_reads_headers_only(synth_root, tmp_path, calls):
    """A second run on the same, unchanged data (a run folder beside the first) decodes nothing and records the
    check in its own folder; the first run's folder is read, never written."""
    first, second, third = (tmp_path / "runs" / n for n in ("a", "b", "c"))
    for run in (first, second, third):
        run.mkdir(parents=True)
    datamodule.write_data_stamp(first, datamodule.check_configured_data(_data(synth_root), run_dir=first))
    before = (first / datamodule.DATA_CHECK_STAMP).stat().st_mtime_ns
    stamp = datamodule.check_configured_data(_data(synth_root), run_dir=second)
    assert calls == [True, False] and stamp
    datamodule.write_data_stamp(second, stamp)
    assert (first / datamodule.DATA_CHECK_STAMP).stat().st_mtime_ns == before
    (first / datamodule.DATA_CHECK_STAMP).unlink()
    assert datamodule.check_configured_data(_data(synth_root), run_dir=third) is not None  # from b's stamp
    assert calls == [True, False, False]
    label = next((synth_root / "training" / "label_2").iterdir())
    st = label.stat()
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    datamodule.check_configured_data(_data(synth_root), run_dir=third)
    assert calls == [True, False, False, True]  # changed data: decoded again
