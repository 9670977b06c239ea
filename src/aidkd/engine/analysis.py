"""``aidkd analyze`` from a run config: the split's dataset and the teacher (and student) models, handed to the
per-instance analysis of ``aidkd.eval.instances``."""
from __future__ import annotations

from pathlib import Path

from aidkd.engine.config import RunConfig
from aidkd.engine.datamodule import DetectionDataModule, synth_root
from aidkd.engine.run_folder import RunFolderError
from aidkd.eval.instances import (
    ANALYSIS_OUTPUTS,
    DEFAULT_SCORE_THRESH,
    collect_rows,
    read_synth_meta,
    write_analysis,
)
from aidkd.models import load_detector


def config_alpha(cfg: RunConfig) -> float:
    """The AID alpha of ``cfg`` (``distill.aid.alpha``; 0.1 for a config without a distill section)."""
    aid = getattr(getattr(cfg, "distill", None), "aid", None)
    return float(aid.alpha) if aid is not None else 0.1


def instance_rows(cfg: RunConfig, teacher: str | Path, split: str = "val", student: str | Path | None = None,
                  score_thresh: float = DEFAULT_SCORE_THRESH, alpha: float | None = None) -> list[dict]:
    """``aidkd.eval.instances.collect_rows`` over ``split`` of ``cfg``'s dataset, from the ``teacher`` checkpoint
    (and ``student``); ``alpha`` defaults to the config's."""
    alpha = config_alpha(cfg) if alpha is None else alpha
    dm = DetectionDataModule(cfg.data)
    dm.prepare_data()
    ds = dm.make_dataset(split, train=False)
    t_model, _ = load_detector(teacher, classes=dm.classes)
    s_model = load_detector(student, classes=dm.classes)[0] if student else None
    root = synth_root(cfg.data) if cfg.data.format == "synth" else Path(cfg.data.root or ".")
    meta = read_synth_meta(root) if cfg.data.format in ("synth", "kitti") else None
    return collect_rows(ds, dm.classes, t_model, s_model, synth_meta=meta,
                        batch_size=cfg.data.val_batch_size or cfg.data.batch_size, score_thresh=score_thresh,
                        alpha=alpha)


def check_analysis_folder(folder: Path) -> None:
    """Refuse an output folder that holds anything but an earlier analysis's files (a dataset, a run folder)."""
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"--out {folder} is a file, not a folder")
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in ANALYSIS_OUTPUTS) if folder.is_dir() else []
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise RunFolderError(f"--out {folder} holds files that are not an earlier analysis ({shown}); choose a new or "
                             "empty folder, e.g. RUN_DIR/analysis")


def analyze(cfg: RunConfig, teacher: str | Path, out_dir: str | Path, split: str = "val",
            student: str | Path | None = None, score_thresh: float = DEFAULT_SCORE_THRESH) -> dict:
    """Run :func:`instance_rows`, write ``instances.csv``, ``summary.json`` and ``weights.png`` into ``out_dir``
    and return the summary. ``out_dir`` must be new, empty or an earlier analysis (which is replaced): a dataset or
    run folder is refused before anything is read or written."""
    check_analysis_folder(Path(out_dir))
    alpha = config_alpha(cfg)
    rows = instance_rows(cfg, teacher, split=split, student=student, score_thresh=score_thresh, alpha=alpha)
    if not rows:
        raise ValueError(f"{split} split of {cfg.name}: no ground-truth instance of {cfg.data.classes or 'the classes'}"
                         " to analyse")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return write_analysis(rows, out_dir, alpha, {
        "teacher_checkpoint": str(teacher), "student_checkpoint": str(student) if student else None, "split": split,
        "score_thresh": score_thresh, "config": cfg.name})
