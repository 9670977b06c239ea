"""End-to-end training on the tiny generated set: metrics, model files, evaluation, resume, determinism, NaN guard."""
import json
import logging
from pathlib import Path

import pytest
import torch

from aidkd.engine.config import config_from_dict
from aidkd.engine.module import NonFiniteLossError
from aidkd.engine.run import evaluate, train
from aidkd.eval import read_metrics
from aidkd.models import load_detector


@pytest.fixture(scope="module")
def deterministic_run(synth_root, tmp_path_factory):
    """Two epochs of a deterministic run, shared by the tests below (one training, several checks)."""
    from tests.conftest import TINY_DATA, TINY_MODEL

    out = tmp_path_factory.mktemp("run")

    def cfg(name, epochs=2):
        return config_from_dict({
            "name": name, "output_dir": str(out / name), "seed": 7,
            "data": dict(TINY_DATA, root=str(synth_root)), "model": dict(TINY_MODEL),
            "train": {"epochs": epochs, "lr": 0.01, "warmup_steps": 2, "log_every": 1, "progress_bar": False,
                      "deterministic": True}})

    torch.set_num_threads(1)
    metrics = train(cfg("full"))
    return cfg, out, metrics


def test_training_writes_models_and_metrics(deterministic_run):
    _, out, metrics = deterministic_run
    run = out / "full"
    for name in ("model_best.pt", "model_last.pt", "checkpoints/last.ckpt", "final_metrics.json", "config.yaml"):
        assert (run / name).exists(), name
    assert {"coco/AP", "coco/AP50", "voc/mAP50", "kitti/moderate_mAP"} <= set(metrics)
    assert json.loads((run / "final_metrics.json").read_text())["coco/AP"] == pytest.approx(metrics["coco/AP"])
    history = [json.loads(line) for line in (run / "metrics_history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1]
    assert any((run / "tb").rglob("events.out.tfevents.*")) and any((run / "csv").rglob("metrics.csv"))


def test_eval_of_last_model_reproduces_final_metrics(deterministic_run):
    cfg, out, metrics = deterministic_run
    again = evaluate(cfg("full"), out / "full" / "model_last.pt")
    for k in ("coco/AP", "coco/AP50", "voc/mAP50"):
        assert again[k] == pytest.approx(metrics[k], abs=1e-6), k


def test_same_seed_same_metrics(deterministic_run):
    cfg, out, metrics = deterministic_run
    again = train(cfg("again"))
    assert again == pytest.approx(metrics, nan_ok=True)
    a = load_detector(out / "full" / "model_last.pt")[0].state_dict()
    b = load_detector(out / "again" / "model_last.pt")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


class _StopAfterFirstEpoch(__import__("lightning").Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def test_resume_continues_to_the_same_result(deterministic_run):
    """Stop after epoch 1 (as a crash after the last checkpoint would), resume to epoch 2: same weights/metrics."""
    cfg, out, metrics = deterministic_run
    train(cfg("resumed"), extra_callbacks=[_StopAfterFirstEpoch()])
    assert len((out / "resumed" / "metrics_history.jsonl").read_text().splitlines()) == 1
    resumed = train(cfg("resumed"), resume=True)
    assert resumed == pytest.approx(metrics, nan_ok=True)


def test_max_steps_mid_epoch_validates_and_checkpoints_the_final_weights(tiny_cfg):
    """train.max_steps may stop between validations: last.ckpt and the final metrics must be of the last step,
    and last.ckpt must follow every validation, not only the improving ones (Lightning's save_last does that)."""
    cfg = config_from_dict(tiny_cfg("steps", train={"epochs": 5, "max_steps": 11, "limit_train_batches": 4}))
    metrics = train(cfg)
    out = Path(cfg.output_dir)
    history = [read_metrics(line) for line in (out / "metrics_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [4, 8, 11]
    assert history[-1] == pytest.approx(dict(metrics, epoch=history[-1]["epoch"], step=11), nan_ok=True)
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 11
    assert torch.load(out / "model_last.pt", weights_only=True)["metrics"]["step"] == 11


class _CtrlCAtStep2(__import__("lightning").Callback):
    """A real Ctrl-C (SIGINT to this process) after step 2: the run stops at that step's end."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_before_the_first_validation_still_saves(tiny_cfg):
    """Nothing has been validated yet (ModelCheckpoint's state still holds -inf): the checkpoint must be written."""
    cfg = config_from_dict(tiny_cfg("ctrl_c", train={"epochs": 3}))
    try:
        train(cfg, extra_callbacks=[_CtrlCAtStep2()])
    except SystemExit:  # Lightning exits after a graceful Ctrl-C shutdown
        pass
    saved = Path(cfg.output_dir) / "checkpoints" / "interrupted.ckpt"
    assert saved.exists()
    assert torch.load(saved, weights_only=True)["global_step"] == 2


def test_non_finite_losses_are_skipped_then_stop(tiny_cfg, monkeypatch, caplog):
    from aidkd.engine import module

    real = module.detection_losses
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        losses = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= 2:  # first step fine, then NaN in the classification term forever
            losses["classification"] = losses["classification"] * float("nan")
        return losses

    monkeypatch.setattr(module, "detection_losses", flaky)
    cfg = config_from_dict(tiny_cfg("nan", train={"epochs": 5, "max_bad_steps": 3, "progress_bar": False}))
    with caplog.at_level(logging.WARNING, logger="aidkd.engine"), pytest.raises(NonFiniteLossError,
                                                                                match="3 consecutive"):
        train(cfg)
    assert "non-finite loss in classification" in caplog.text
    assert calls["n"] == 4
    # nothing non-finite reached a checkpoint
    for ckpt in (cfg_dir := Path(cfg.output_dir)).rglob("*.ckpt"):
        state = torch.load(ckpt, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert cfg_dir.exists()


def _same_weights(a, b):
    sa, sb = load_detector(a)[0].state_dict(), load_detector(b)[0].state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_gives_identical_weights(deterministic_run):
    _, out, _ = deterministic_run
    assert _same_weights(out / "full" / "model_last.pt", out / "resumed" / "model_last.pt")


def test_sigkill_mid_training_then_resume(deterministic_run):
    """Kill -9 the CLI after its first checkpoint; ``--resume`` ends with the uninterrupted run's metrics."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from aidkd.engine.config import dump_config

    cfg, out, metrics = deterministic_run
    c = cfg("killed")
    c.train.epochs = 3  # long enough to be killed in the middle
    yaml_path = out / "killed.yaml"
    dump_config(c, yaml_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "aidkd.cli.main", "train", str(yaml_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = out / "killed" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert last.exists(), "no checkpoint was written"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    torch.load(last, weights_only=True)  # the checkpoint on disk is whole (atomic write)
    # resume to epoch 2 and compare with the uninterrupted 2-epoch run
    done = subprocess.run(cmd[:-1] + [str(yaml_path), "--resume", "--set", "train.epochs=2"], env=env, check=False,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    final = read_metrics((out / "killed" / "final_metrics.json").read_text())
    assert final == pytest.approx(metrics, nan_ok=True)
    assert _same_weights(out / "full" / "model_last.pt", out / "killed" / "model_last.pt")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interrupt_saves_a_checkpoint_and_exits_nonzero(deterministic_run, sig):
    """Ctrl-C and SIGTERM (docker stop, a scheduler's preemption, kill) both leave checkpoints/interrupted.ckpt; a
    SIGTERM'd run exits 143, a Ctrl-C'd one 130, as a process the signal killed would (Lightning's SystemExit alone
    would exit 0)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from aidkd.engine.config import dump_config

    cfg, out, _ = deterministic_run
    name = sig.lower()
    c = cfg(name)
    c.train.epochs = 50
    dump_config(c, out / f"{name}.yaml")
    log = out / f"{name}.log"  # the child's output, shown when the test fails
    with log.open("w") as log_file:
        # a background job (`cmd &` in a non-interactive shell, e.g. CI under nohup) inherits SIGINT ignored, and
        # Python then never installs its Ctrl-C handler; an ignored signal stays ignored across exec, a handled one
        # does not: handle it here while the child starts, so that SIGINT means Ctrl-C to it
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            proc = subprocess.Popen([sys.executable, "-m", "aidkd.cli.main", "train", str(out / f"{name}.yaml")],
                                    env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=log_file,
                                    stderr=subprocess.STDOUT)
        finally:
            signal.signal(signal.SIGINT, previous)
        last = out / name / "checkpoints" / "last.ckpt"
        wait_s = 420  # generous: the first validation is slow on a loaded 2-core machine
        deadline = time.time() + wait_s
        while not last.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        if not last.exists():
            proc.kill()
            pytest.fail(f"no last.ckpt after {wait_s} s (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
        proc.send_signal(getattr(signal, sig))
        code = proc.wait(timeout=120)
    saved = out / name / "checkpoints" / "interrupted.ckpt"
    assert saved.exists(), f"{sig} must leave a checkpoint; child output:\n{log.read_text()[-3000:]}"
    assert torch.load(saved, weights_only=True)["global_step"] > 0
    assert code == 128 + getattr(signal, sig), log.read_text()[-3000:]  # 143 and 130, as the signal killed it
    assert not (out / name / "final_metrics.json").exists()  # an interrupted run is not a finished one


def test_a_run_writes_its_split_and_eval_kitti_reads_it(deterministic_run, synth_root, tmp_path, capsys):
    """RUN_DIR/split/{train,val}.txt hold the stems the run trained and validated on; `aidkd eval-kitti --split
    RUN_DIR` scores exactly the validation frames."""
    from aidkd.cli.main import main
    from aidkd.engine.datamodule import DetectionDataModule

    cfg, out, _ = deterministic_run
    dm = DetectionDataModule(cfg("full").data)
    dm.setup("fit")
    run = out / "full"
    train_stems = (run / "split" / "train.txt").read_text().split()
    val_stems = (run / "split" / "val.txt").read_text().split()
    assert train_stems == [r.stem for r in dm.train_set.records] and val_stems == [r.stem for r in dm.val_set.records]
    assert len(train_stems) == 16 and len(val_stems) == 4 and not set(train_stems) & set(val_stems)
    # prediction files for the val frames only: with the run's split, no label file lacks one
    labels = synth_root / "training" / "label_2"
    preds = tmp_path / "pred"
    preds.mkdir()
    for stem in val_stems:
        lines = [line.split() for line in (labels / f"{stem}.txt").read_text().splitlines()]
        (preds / f"{stem}.txt").write_text("".join(" ".join(f[:15] + ["0.9"]) + "\n" for f in lines))
    with_run, with_file, everything = tmp_path / "run.json", tmp_path / "file.json", tmp_path / "all.json"
    capsys.readouterr()
    assert main(["eval-kitti", str(labels), str(preds), "--split", str(run), "--json", str(with_run)]) == 0
    assert "no prediction file" not in capsys.readouterr().out
    main(["eval-kitti", str(labels), str(preds), "--json", str(everything)])
    assert "16 of 20 label files have no prediction file" in capsys.readouterr().err
    main(["eval-kitti", str(labels), str(preds), "--split", str(run / "split" / "val.txt"), "--json", str(with_file)])
    assert with_run.read_text() == with_file.read_text() != everything.read_text()
    assert main(["eval-kitti", str(labels), str(preds), "--split", str(tmp_path)]) == 2
    assert "without split/val.txt" in capsys.readouterr().err


def test_resumed_run_drops_interrupted_ckpt_and_sums_its_train_time(tiny_cfg, capsys):
    """After a Ctrl-C and a resume that writes a newer last.ckpt, interrupted.ckpt is gone; train_time.json sums both
    segments; outside a terminal every epoch prints one plain line (loss, elapsed, ETA)."""
    cfg = config_from_dict(tiny_cfg("segments", train={"epochs": 2}))
    with pytest.raises(SystemExit):  # Lightning exits after a graceful Ctrl-C shutdown
        train(cfg, extra_callbacks=[_CtrlCAtStep2()])
    ckpts = Path(cfg.output_dir) / "checkpoints"
    first = torch.load(ckpts / "interrupted.ckpt", weights_only=True)["callbacks"]["TrainTime"]
    assert first["segments"] == 1 and first["seconds"] > 0
    assert not (Path(cfg.output_dir) / "train_time.json").exists()
    capsys.readouterr()
    train(config_from_dict(tiny_cfg("segments", train={"epochs": 2})), resume=True)
    assert not (ckpts / "interrupted.ckpt").exists() and (ckpts / "last.ckpt").exists()
    record = json.loads((Path(cfg.output_dir) / "train_time.json").read_text())
    assert record["segments"] == 2 and record["seconds"] > first["seconds"]
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("segments: epoch")]
    assert [line.split()[2] for line in lines] == ["1/2", "2/2"]  # the resumed epoch 1 and epoch 2
    assert all("loss " in line and " elapsed " in line and " ETA " in line for line in lines)
    assert lines[-1].endswith("ETA 0:00") and float(lines[-1].split("loss ")[1].split()[0]) > 0
