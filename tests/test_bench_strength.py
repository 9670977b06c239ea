"""benchmarks/strength.py's profiles and run configs (pure Python: nothing is trained here)."""

import pytest

from aidkd.engine.config import config_from_dict
from aidkd.engine.demo import DEMO_DATA, DEMO_SYNTH


@pytest.fixture(scope="module")
def strength(load_benchmark):
    return load_benchmark("strength")


def _student_config(strength, argv, tmp_path, batch=4):
    args = strength.parse_args(["--out", str(tmp_path), *argv])
    model = strength.model_section("gfl", args.student_backbone, args.student_fpn)
    return args, strength.run_config("s", tmp_path, args, "gfl", 0, args.student_epochs, batch, model, None)


def test_tiny_profile_keeps_the_first_measurements_configs(strength, tmp_path):
    """Without --profile the configs are those of benchmarks/results/strength_cpu (reproducible)."""
    args, cfg = _student_config(strength, [], tmp_path)
    assert (args.profile, args.num_images, args.height, args.width) == ("tiny", 80, 64, 192)
    assert cfg["data"]["synth"] == {"num_images": 80, "seed": 0, "width": 192, "height": 64, "hard_fraction": 0.2,
                                    "mislabel_fraction": 0.05}
    assert "classes" not in cfg["data"]  # KITTI's three classes, as before
    assert cfg["train"]["lr"] == 1e-3 and cfg["train"]["warmup_steps"] == 20 and "scheduler" not in cfg["train"]
    assert cfg["model"]["backbone"] == "resnet18"


def test_easy_profile_is_the_demos_generated_set_and_schedule(strength, tmp_path):
    args, cfg = _student_config(strength, ["--profile", "easy", "--student-backbone", "mobilenet_v3_small"], tmp_path)
    assert (args.num_images, args.height, args.width) == (200, 96, 320)
    synth = cfg["data"]["synth"]
    # every generator setting of the demo's scenes, so the set is the same one the demo trains on
    assert {k: synth[k] for k in DEMO_SYNTH} == DEMO_SYNTH
    assert cfg["data"]["classes"] == DEMO_DATA["classes"] == ["Car"]
    assert (cfg["data"]["min_size"], cfg["data"]["max_size"]) == (96, 320)
    assert (cfg["train"]["lr"], cfg["train"]["scheduler"], cfg["train"]["warmup_steps"]) == (2e-3, "cosine", 30)
    assert cfg["model"]["backbone"] == "mobilenet_v3_small"
    built = config_from_dict(cfg)  # a valid run config
    assert built.data.classes == ["Car"] and built.data.synth.min_t == 0.3


def test_explicit_size_overrides_the_profile(strength, tmp_path):
    args, cfg = _student_config(strength, ["--profile", "easy", "--num-images", "40", "--height", "64"], tmp_path)
    assert (args.num_images, args.height, args.width) == (40, 64, 320)
    assert cfg["data"]["synth"]["num_images"] == 40 and cfg["data"]["synth"]["clutter"] == 3


def test_unknown_profile_is_refused(strength, capsys):
    with pytest.raises(SystemExit):
        strength.parse_args(["--profile", "hard"])
    assert "invalid choice: 'hard'" in capsys.readouterr().err


def test_transfer_small_is_off_by_default(strength):
    assert strength.parse_args([]).transfer_small is False
    args = strength.parse_args(["--transfer-small", "--small-scale", "0.002"])
    assert args.transfer_small is True and args.small_scale == 0.002


def test_distill_section_freezes_the_teacher_block_and_sets_aid_only_when_asked(strength):
    """Transfer and alpha runs use the frozen teacher-side non-local block (the module default); AID is instance
    granularity at the given alpha and off otherwise, and the weights of method.md are not mutated."""
    kd = strength.distill_section("t.pt", strength.WEIGHTS["gfl"], 0.001)
    nl = next(m for m in kd["methods"] if m["name"] == "nonlocal")
    assert nl["params"]["train_teacher_block"] is False and kd["aid"] == {"enabled": False}
    assert "train_teacher_block" not in strength.WEIGHTS["gfl"][1]["params"]
    aid = strength.distill_section("t.pt", strength.WEIGHTS["gfl"], 0.001, aid_alpha=3.0)["aid"]
    assert aid == {"enabled": True, "granularity": "instance", "alpha": 3.0}
    assert config_from_dict({"distill": strength.distill_section("t.pt", strength.WEIGHTS["gfl"], 1e-3,
                                                                 aid_alpha=0.3)}).distill.aid.alpha == 0.3
    assert strength.parse_args(["--what", "alpha"]).alphas == [0.1, 0.3, 1.0, 3.0]
    normed = strength.distill_section("t.pt", strength.WEIGHTS["gfl"], 1e-3, aid_alpha=1.0, aid_normalize=True)
    assert config_from_dict({"distill": normed}).distill.aid.normalize
    assert not config_from_dict({"distill": kd}).distill.aid.normalize
    with pytest.raises(ValueError, match="aid_alpha"):
        strength.distill_section("t.pt", strength.WEIGHTS["gfl"], 1e-3, aid_normalize=True)
