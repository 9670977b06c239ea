"""`aidkd demo`: the README's main command. Its plan (pure) and a --quick run end to end."""
import json

import pytest

from aidkd.engine.config import config_from_dict
from aidkd.engine.demo import demo_configs, run_demo


def test_demo_plan(tmp_path):
    cfgs = demo_configs(tmp_path)
    assert list(cfgs) == ["teacher", "student", "kd", "kd_aid"]
    t, s = cfgs["teacher"], cfgs["student"]
    assert t["train"]["epochs"] > s["train"]["epochs"], "the teacher needs the longer schedule to be the better model"
    assert t["model"]["backbone"] == "resnet50" and s["model"]["backbone"] == "resnet18"
    for name in ("student", "kd", "kd_aid"):  # one schedule, one model for every student run
        assert cfgs[name]["train"] == s["train"] and cfgs[name]["model"] == s["model"]
    assert cfgs["kd"]["distill"]["aid"]["enabled"] is False and cfgs["kd_aid"]["distill"]["aid"]["enabled"] is True
    assert cfgs["kd"]["distill"]["loss_scale"] == cfgs["kd_aid"]["distill"]["loss_scale"] < 1
    assert cfgs["kd_aid"]["distill"]["teacher"]["checkpoint"] == str(tmp_path / "teacher" / "model_best.pt")
    for raw in cfgs.values():
        config_from_dict(raw)  # every config is valid
    assert demo_configs(tmp_path, arch="retinanet")["student"]["model"]["kwargs"] == {"anchor_size": 16}
    assert demo_configs(tmp_path)["student"]["model"]["arch"] == "gfl"


@pytest.mark.timeout(300)
def test_quick_demo_writes_the_table(tmp_path):
    results = run_demo(tmp_path, quick=True)
    assert list(results) == ["teacher", "student", "kd", "kd_aid"]
    for r in results.values():
        assert 0.0 <= r["metrics"]["coco/AP"] <= 100.0 and r["seconds"] > 0
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[0].startswith("| run | COCO AP") and len(table) == 2 + 4
    assert json.loads((tmp_path / "results.json").read_text()).keys() == results.keys()
    assert (tmp_path / "kd_aid" / "model_best.pt").exists()
