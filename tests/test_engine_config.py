import pytest

from aidkd.engine.config import ConfigError, RunConfig, load_config


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 0.02\nmodel:\n  arch: fcos\n")
    cfg = load_config(p, ["train.epochs=3", "data.classes=[Car, Pedestrian]", "distill.aid.alpha=0.2"])
    assert isinstance(cfg, RunConfig)
    assert cfg.train.lr == 0.02 and cfg.train.epochs == 3 and cfg.model.arch == "fcos"
    assert cfg.data.classes == ["Car", "Pedestrian"]
    assert cfg.distill.aid.alpha == 0.2 and cfg.distill.aid.granularity == "instance"


@pytest.mark.parametrize("override, needle", [
    ("train.lrr=1", "unknown config key 'train.lrr'"),
    ("train.lr=fast", "config key 'train.lr': expected float"),
    ("model.arch=yolo", "config key 'model.arch': expected one of"),
    ("data.classes=[1]", "config key 'data.classes[0]': expected str"),
    ("bogus=1", "unknown config key 'bogus'"),
    ("distill.aid.granularity=pixel", "config key 'distill.aid.granularity'"),
    ("distill.aid.global_terms=instance", "config key 'distill.aid.global_terms'"),
    ("train.epochs=1.5", "config key 'train.epochs': expected int"),
])
def test_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_yaml_is_loaded_safely(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(p)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_an_int_stays_an_int_in_a_float_or_int_key():
    """limit_train_batches: 1 means one batch; read as the float 1.0 Lightning would run 100 % of them."""
    from aidkd.engine.config import config_from_dict

    cfg = config_from_dict({"train": {"limit_train_batches": 1, "limit_val_batches": 0.5}})
    assert type(cfg.train.limit_train_batches) is int and cfg.train.limit_val_batches == 0.5


def test_a_float_key_takes_a_fraction(tmp_path):
    """`loss_scale: 1/1000` as written in a YAML file or a --set is the number 0.001; nothing is evaluated."""
    p = tmp_path / "c.yaml"
    p.write_text("distill:\n  loss_scale: 1/1000\ntrain:\n  lr: 2.5e-2 / 5\n")
    cfg = load_config(p, ["train.grad_clip=3/4"])
    assert cfg.distill.loss_scale == pytest.approx(1e-3) and type(cfg.distill.loss_scale) is float
    assert cfg.train.lr == pytest.approx(5e-3) and cfg.train.grad_clip == pytest.approx(0.75)
    assert load_config(None, ["distill.loss_scale=1/400"]).distill.loss_scale == pytest.approx(1 / 400)
    for bad in ("1/0", "1/1000/2", "2**3/4", "a/b", "1/", "__import__('os')/1"):
        with pytest.raises(ConfigError, match="config key 'distill.loss_scale': expected float"):
            load_config(None, [f"distill.loss_scale={bad}"])
    with pytest.raises(ConfigError, match="config key 'train.epochs': expected int"):
        load_config(None, ["train.epochs=12/2"])  # an int key takes no fraction


@pytest.mark.parametrize("fmt, override, needle", [
    ("yolo", "data.val_fraction=0.3", "'data.val_fraction' does not apply to yolo data"),
    ("yolo", "data.train_split_file=train.txt", "'data.train_split_file' does not apply to yolo data"),
    ("coco", "data.val_split_file=val.txt", "'data.val_split_file' does not apply to coco data"),
    ("coco", "data.split_seed=3", "'data.split_seed' does not apply to coco data"),
    ("kitti", "data.train_ann=a.json", "'data.train_ann' does not apply to kitti data"),
    ("synth", "data.val_images=imgs", "'data.val_images' does not apply to synth data"),
])
def test_a_data_key_the_format_would_ignore_is_refused(tmp_path, fmt, override, needle):
    """A split setting the format never reads would be silently ignored: the run would not split as asked."""
    p = tmp_path / "c.yaml"
    p.write_text(f"data:\n  format: {fmt}\n  root: {tmp_path}\n")
    with pytest.raises(ConfigError, match=needle) as e:
        load_config(p, [override])
    assert str(p) in str(e.value)


def test_a_dumped_config_with_every_default_loads_again(tmp_path):
    from aidkd.engine.config import dump_config

    for fmt in ("yolo", "coco", "kitti"):
        cfg = load_config(None, [f"data.format={fmt}", f"data.root={tmp_path}"])
        dump_config(cfg, tmp_path / f"{fmt}.yaml")
        assert load_config(tmp_path / f"{fmt}.yaml").data.format == fmt


@pytest.mark.parametrize("value", [8, 9000])
def test_synth_image_sides_outside_the_generators_range_are_refused_by_the_config(value):
    """The config accepts what the generator accepts (16-8192 px a side), not a size it would refuse later."""
    from aidkd.data.synth import MAX_SIDE, MIN_SIDE

    with pytest.raises(ConfigError, match=f"data.synth.width.*{MIN_SIDE}.*{MAX_SIDE}"):
        load_config(None, [f"data.synth.width={value}"])
