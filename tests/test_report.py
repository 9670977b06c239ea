"""aidkd.report: the self-contained HTML report of a run / a folder of runs, rendered in headless Chromium."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from aidkd.engine.config import config_from_dict, dump_config
from aidkd.models import build_detector, model_meta, save_model_file
from aidkd.report import ap_noise, best_row, build_report, discover_runs, read_aid_weights, tensorboard_images

CLASSES = ["Car", "Pedestrian", "Cyclist"]
MIN, MAX = 64, 192  # the conftest synth set: 192x64 scenes


def _model(path, fpn=16):
    torch.manual_seed(0)
    model = build_detector("retinanet", "resnet18", len(CLASSES) + 1, min_size=MIN, max_size=MAX, fpn_channels=fpn)
    with torch.no_grad():  # distinct scores, so the drawn samples and PR curves have detections
        for name, p in model.head.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
            elif "cls_logits" in name:
                p.fill_(-2.0)
                p.view(-1, len(CLASSES) + 1)[:, 0] = -20.0  # the background slot never fires
    return save_model_file(path, model, model_meta(model, CLASSES, MIN, MAX, {}))


def _metrics(ap: float) -> dict:
    m = {"coco/AP": ap, "coco/AP50": 2 * ap, "voc/mAP50": 2 * ap, "kitti/moderate_mAP": ap, "epoch": 1, "step": 8}
    for c in CLASSES:
        m[f"coco/AP/{c}"] = ap
        m[f"voc/AP50/{c}"] = 2 * ap
        for d in ("easy", "moderate", "hard"):
            m[f"kitti/{c}/{d}"] = ap
    return m


def _write_run(run_dir, cfg: dict, ap: float, tb_images: bool = False):
    run_dir.mkdir(parents=True)
    dump_config(config_from_dict(cfg), run_dir / "config.yaml")
    _model(run_dir / "model_best.pt", fpn=cfg["model"]["fpn_channels"])
    (run_dir / "best_metrics.json").write_text(json.dumps(_metrics(ap)))
    (run_dir / "metrics_history.jsonl").write_text(
        "\n".join(json.dumps(dict(_metrics(ap * f), epoch=e)) for e, f in enumerate((0.5, 1.0))) + "\n")
    (run_dir / "csv").mkdir()
    # loss terms as DetectionTask logs them: train/<detection term>, train/distill/<method>/<term>, train/loss
    rows = [("epoch,step,train/loss,train/classification,train/bbox_regression,train/distill/attention/am,"
             "val/coco/AP")]
    rows += [f"0,{s},{2.0 - 0.1 * s},{1.5 - 0.1 * s},0.4,0.1," for s in range(8)] + [f"1,8,,,,,{ap}"]
    (run_dir / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    if tb_images:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb"))
        for step in (0, 10):
            img = torch.rand(3, MIN, MAX)
            writer.add_image("distill/instance_weights", img, step)
            writer.add_image("distill/teacher_spatial_attention", torch.rand(1, 8, 24), step)
        writer.add_scalar("train/loss", 1.0, 0)
        writer.close()


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory, synth_root):
    """teacher + kd_aid (distilled from it, with TensorBoard images) + a broken run, as `aidkd demo` lays out."""
    root = tmp_path_factory.mktemp("demo")
    base = {"seed": 0, "train": {"epochs": 2, "progress_bar": False},
            "data": {"format": "synth", "root": str(synth_root), "min_size": MIN, "max_size": MAX,
                     "synth": {"num_images": 20, "seed": 3, "width": MAX, "height": MIN}}}
    teacher = dict(base, name="teacher", output_dir=str(root / "teacher"),
                   model={"arch": "retinanet", "backbone": "resnet18", "fpn_channels": 32})
    _write_run(root / "teacher", teacher, 40.0)
    kd = dict(base, name="kd_aid", output_dir=str(root / "kd_aid"),
              model={"arch": "retinanet", "backbone": "resnet18", "fpn_channels": 16},
              distill={"teacher": {"checkpoint": str(root / "teacher" / "model_best.pt")},
                       "methods": [{"name": "attention", "params": {}}], "aid": {"enabled": True}})
    _write_run(root / "kd_aid", kd, 30.0, tb_images=True)
    (root / "kd_aid" / "aid_weights.jsonl").write_text(
        json.dumps({"step": 0, "weights": [1.0, 0.5, 0.25], "classes": ["Car", "Car", "Pedestrian"]}) + "\n" +
        json.dumps({"step": 10, "weights": [0.75], "classes": ["Car"]}) + "\nnot json\n")
    # a resumed run's own record of its training time, both segments (train_time.json), over the demo's results.json
    (root / "kd_aid" / "train_time.json").write_text(json.dumps({"seconds": 9.4, "segments": 2}))
    from aidkd.eval import instances

    rows = [{"class": "Car", "teacher_loss": 0.5, "found": True, "difficulty": "easy"},
            {"class": "Car", "teacher_loss": 4.0, "found": False, "difficulty": "easy"}]
    (root / "kd_aid" / "analysis").mkdir()
    (root / "kd_aid" / "analysis" / "summary.json").write_text(json.dumps(instances.summarize(rows, alpha=0.1)))
    broken = root / "broken"
    broken.mkdir()
    (broken / "best_metrics.json").write_text(json.dumps({"coco/AP": 1.5}))
    (root / "results.json").write_text(json.dumps({"teacher": {"metrics": {}, "seconds": 12.0},
                                                   "kd_aid": {"metrics": {}, "seconds": 7.0}}))
    return root


@pytest.fixture(scope="module")
def demo_report(demo_folder):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module scope runs before conftest's single-thread fixture; 2 threads crawl on CI
    try:
        return build_report(demo_folder, demo_folder / "out" / "report.html", latency_runs=2, num_samples=2)
    finally:
        torch.set_num_threads(threads)


def test_discover_runs_demo_order(demo_folder):
    assert [p.name for p in discover_runs(demo_folder)] == ["teacher", "kd_aid", "broken"]
    assert discover_runs(demo_folder / "kd_aid") == [demo_folder / "kd_aid"]
    with pytest.raises(FileNotFoundError):
        discover_runs(demo_folder / "nope")


def test_tensorboard_images(demo_folder):
    imgs = tensorboard_images(demo_folder / "kd_aid" / "tb")
    assert set(imgs) == {"distill/instance_weights", "distill/teacher_spatial_attention"}
    assert [s for s, _ in imgs["distill/instance_weights"]] == [0, 10]
    assert all(png.startswith(b"\x89PNG") for _, png in imgs["distill/instance_weights"])


def test_report_contents(demo_report):
    page = demo_report.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # self-contained: no scripts, no external resources
    assert "<script" not in page and not re.search(r'(src|href)="(https?:)?//', page)
    assert not re.search(r'<link[^>]+stylesheet', page)
    for sid in ("overview", "comparison", "run-teacher", "run-kd_aid", "run-broken", "metrics-kd_aid",
                "per-class-kd_aid", "pr-curves-kd_aid", "training-kd_aid", "speed-kd_aid", "samples-kd_aid",
                "distill-images-kd_aid"):
        assert f'id="{sid}"' in page, sid
    kd = page[page.index('id="run-kd_aid"'):page.index('id="run-broken"')]
    assert kd.count('src="data:image/png;base64,') >= 2 + 2 + 2 + 2  # PR, training, 2 samples, 4 TB images
    assert "distill/instance_weights" in kd and "distill/teacher_spatial_attention" in kd
    assert "re-evaluated (4 val images)" in kd and "KITTI moderate" in kd and "Pedestrian" in kd
    assert "teacher retinanet/resnet18 (teacher)" in kd  # teacher vs student speed
    assert re.search(r"parameters, latency \d\.\d\dx on the CPU", kd) and "faster" not in kd
    comparison = page[page.index('id="comparison"'):page.index('id="analysis"')]
    assert all(n in comparison for n in ("teacher", "kd_aid", "broken"))
    assert ">12<" in comparison and ">9<" in comparison  # results.json, and kd_aid's own train_time.json
    teacher = page[page.index('id="run-teacher"'):page.index('id="run-kd_aid"')]
    assert "not available: not a distillation run" in teacher
    broken = page[page.index('id="run-broken"'):]
    assert broken.count("not available") >= 5 and "1.5" in broken


def test_report_single_run_with_missing_parts(tmp_path):
    run = tmp_path / "run"
    cfg = {"name": "run", "output_dir": str(run), "data": {"format": "kitti", "root": str(tmp_path / "missing")},
           "model": {"arch": "fcos", "backbone": "resnet18", "fpn_channels": 16},
           "distill": {"teacher": {"checkpoint": str(tmp_path / "no_teacher.pt")}}}
    run.mkdir()
    dump_config(config_from_dict(cfg), run / "config.yaml")
    out = build_report(run)
    assert out == run / "report.html"
    page = out.read_text()
    assert 'id="comparison"' not in page and 'id="run-run"' in page
    for what in ("KITTI root not found", "no model file", "teacher checkpoint not found", "no TensorBoard folder",
                 "no csv/metrics.csv"):
        assert what in page, what


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_report_renders_in_chromium(demo_report, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium binary (apt-get install chromium)")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    url = demo_report.resolve().as_uri()
    shot = tmp_path / "report.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1280,2000", url], check=True, timeout=120,
                   capture_output=True)
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        arr = np.asarray(im.convert("L"), dtype=np.float32)
    assert arr.std() > 5  # not a blank page
    dom = subprocess.run(flags + ["--dump-dom", url], check=True, timeout=120, capture_output=True,
                         text=True).stdout
    for sid in ("overview", "comparison", "run-teacher", "run-kd_aid", "pr-curves-kd_aid", "samples-kd_aid",
                "distill-images-kd_aid", "speed-kd_aid"):
        assert f'id="{sid}"' in dom, sid
    assert "aidkd report" in dom and dom.count("<img") >= 10 and "<table" in dom


def test_report_aid_weights_loss_terms_and_samples(demo_report):
    page = demo_report.read_text()
    kd = page[page.index('id="run-kd_aid"'):page.index('id="run-broken"')]
    aid = kd[kd.index('id="aid-weights-kd_aid"'):kd.index('id="distill-images-kd_aid"')]
    assert "4 positive instances over 2 logging steps" in aid and 'src="data:image/png;base64,' in aid
    # per class: Car 1.0, 0.5, 0.75 (mean 0.75); Pedestrian 0.25
    assert "<td>Car</td><td>3</td><td>0.7500</td>" in aid and "<td>Pedestrian</td><td>1</td><td>0.2500</td>" in aid
    losses = kd[kd.index('id="losses-kd_aid"'):kd.index('id="speed-kd_aid"')]
    assert 'src="data:image/png;base64,' in losses
    assert "<td>distill/attention/am</td><td>distillation</td>" in losses
    assert "<td>classification</td><td>detection</td><td>1.5</td>" in losses
    teacher = page[page.index('id="run-teacher"'):page.index('id="run-kd_aid"')]
    assert "not available: not a distillation run" in teacher[teacher.index('id="aid-weights-teacher"'):]
    # samples: the detections eval scores, at eval.score_thresh (0.05), not a separate drawing threshold
    samples = kd[kd.index('id="samples-kd_aid"'):kd.index('id="aid-weights-kd_aid"')]
    assert samples.count("detections &gt;= 0.05 (eval.score_thresh)") == 2


def test_read_aid_weights(tmp_path):
    p = tmp_path / "w.jsonl"
    p.write_text('{"step": 3, "weights": [0.5, 1], "classes": ["a", "b"]}\n{"step": 4, "weights": [1]}\n')
    assert read_aid_weights(p) == ([0.5, 1.0], ["a", "b"], [3, 3])


def test_best_only_beyond_noise():
    assert ap_noise(50.0, 100) == pytest.approx(5.0) and ap_noise(0.0, 100) == pytest.approx(1.0)
    assert np.isnan(ap_noise(10.0, 0))
    assert best_row([30.0, 29.0], [1.0, 1.0]) is None  # 1 point apart, noise 1.4 each way
    assert best_row([40.0, 30.0, 20.0], [1.0, 1.0, 1.0]) == 0
    assert best_row([5.0, 10.0], [0.1, 0.1], higher=False) == 0
    assert best_row([40.0, 30.0], [float("nan"), 1.0]) is None and best_row([40.0], [1.0]) is None


def test_comparison_delta_digits_and_noise(tmp_path):
    from aidkd.report import EvalResult, Run
    from aidkd.report.html import _comparison_html

    def run(name, ap, n_gt):
        m = {"coco/AP": ap, "coco/AP50": 2 * ap, "voc/mAP50": 2 * ap, "kitti/moderate_mAP": ap}
        return Run(name=name, path=tmp_path / name, metrics=m,
                   evaluation=EvalResult(m, None, [], 10, 10, 0.0, n_gt=n_gt))

    html = _comparison_html([run("student", 12.34, 5000), run("kd", 12.87, 5000), run("kd_aid", 20.0, 5000)])
    assert "Δ COCO AP vs student" in html and "+0.53" in html and "+7.66" in html and "12.34" in html
    assert html.count('class="best"') == 4  # kd_aid's AP, AP50, VOC, KITTI moderate: far beyond the noise
    close = _comparison_html([run("student", 12.34, 50), run("kd", 12.87, 50)])
    assert 'class="best"' not in close  # 0.5 points on 50 boxes is noise


def test_folder_page_has_each_runs_instance_analysis_and_load(demo_report):
    """The folder-of-runs page shows a run's `aidkd analyze` folder (RUN/analysis) as the single-run page does, and
    the latencies come with how they were timed and the machine's load."""
    page = demo_report.read_text()
    analysis = page[page.index('id="analysis"'):page.index('id="run-teacher"')]
    assert "kd_aid" in analysis and "ROC AUC of w for found vs missed: 1.000" in analysis
    comparison = page[page.index('id="comparison"'):page.index('id="analysis"')]
    assert "timed interleaved in one process" in comparison and re.search(r"1-min load average \d+\.\d", comparison)
    assert re.search(r"<td>\d+\.\d ± \d+\.\d</td>", page[page.index('id="speed-kd_aid"'):])


def test_latency_is_timed_interleaved():
    """Round r times every model once, starting at model r mod n: a change of load falls on every model alike."""
    from aidkd.report import measure_speeds

    calls = []

    class Sleeper(torch.nn.Module):
        def __init__(self, name, seconds):
            super().__init__()
            self.name, self.seconds, self.w = name, seconds, torch.nn.Parameter(torch.zeros(3))

        def forward(self, x):
            calls.append(self.name)
            import time

            time.sleep(self.seconds)
            return x

    speeds = measure_speeds({"t": (Sleeper("t", 0.012), (8, 8)), "s": (Sleeper("s", 0.002), (8, 8))}, runs=4)
    assert calls[4:] == ["t", "s", "s", "t", "t", "s", "s", "t"]  # after 2 warm-up passes each
    assert speeds["t"].passes == speeds["s"].passes == 4 and speeds["t"].params == 3
    assert speeds["t"].latency_ms >= 12 > speeds["s"].latency_ms >= 2 and speeds["s"].load_avg is not None


def test_header_says_how_long_the_report_took(tmp_path, monkeypatch):
    """The header's duration covers the page too (its charts and images are most of the work)."""
    import time

    from aidkd.report import html as report_html

    run = tmp_path / "run"
    run.mkdir()
    dump_config(config_from_dict({"name": "run", "output_dir": str(run),
                                  "data": {"format": "kitti", "root": str(tmp_path / "missing")}}),
                run / "config.yaml")
    real = report_html._run_html
    monkeypatch.setattr(report_html, "_run_html", lambda r: (time.sleep(1.6), real(r))[1])
    page = build_report(run).read_text()
    assert int(re.search(r"in (\d+) s</p>", page).group(1)) >= 2


def test_metric_tables_escape_the_pipe():
    """`KITTI AP|R40` in a markdown table cell must not split it."""
    from aidkd.eval import format_metrics_table

    table = format_metrics_table({"coco/AP": 12.5, "kitti/moderate_mAP": 40.0, "kitti/Car/hard": 20.0})
    for line in table.splitlines():
        cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
        assert len(cells) == 3, line
    assert "KITTI AP\\|R40" in table

