"""``agentlit profile``: MACs (against the paper and the formula), the per-module breakdown, the
report/JSON it promises for every task type, tasks defined outside agentlit profiled through the
task protocol alone, and the CLI. No timings are asserted (speed is measured in benchmarks/), only
that they were taken."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agentlit.profiling import format_report, mac_breakdown, profile_module
from agentlit.tasks.base import TaskModule

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
TINY_DEIT = dict(model_name="agent_deit_tiny", num_classes=10, img_size=16, drop_path_rate=0.0,
                 model_kwargs=dict(patch_size=8, depth=1, agent_num=4, embed_dim=32, num_heads=2))
REPORT_KEYS = {"task", "module", "model", "model_kwargs", "input", "precision", "params", "macs", "macs_breakdown",
               "inference", "train", "machine", "wall_time_s"}
MACHINE_KEYS = {"cpu", "cores", "torch_threads", "torch", "device"}


def _check_measured(section: dict, batch: int) -> None:
    st = section["step_time_s"]
    assert section["items_per_step"] == batch and len(st["runs"]) >= 1
    assert st["min"] <= st["median"] <= st["max"] and section["items_per_s"] == pytest.approx(batch / st["median"])
    assert section["memory"]["peak_mib"] > 0


def test_mac_breakdown_attributes_every_mac_once_and_merges_repeated_blocks():
    per = {"": 100, "m": 90, "m.blocks.0": 40, "m.blocks.1": 40, "m.blocks.0.fc": 30, "m.blocks.1.fc": 30, "m.head": 10}
    rows = mac_breakdown(per, 100)
    assert {r["module"]: (r["macs"], r["instances"]) for r in rows} == {
        "m.blocks.*.fc": (60, 2), "m.blocks.* [direct]": (20, 2), "(root)": (10, 1), "m.head": (10, 1)}
    assert sum(r["macs"] for r in rows) == 100 and rows[0]["share"] == pytest.approx(0.6)
    top = mac_breakdown(per, 100, top=2)
    assert [r["module"] for r in top] == ["m.blocks.*.fc", "m.blocks.* [direct]", "(other)"]
    assert top[-1]["macs"] == 20 and top[-1]["instances"] == 2


def test_profile_tiny_classifier_report_json_and_table(tmp_path, capsys):
    from agentlit.data import DigitsDataModule
    from agentlit.tasks import ClassificationModule

    torch.manual_seed(0)
    module = ClassificationModule(**TINY_DEIT)
    dm = DigitsDataModule(img_size=16, batch_size=6)
    out = tmp_path / "sub" / "profile.json"
    report = profile_module(None, module, dm, steps=2, warmup=1, threads=1, output=str(out))
    table = capsys.readouterr().out
    for needle in ("agent_deit_tiny", "parameters", "MACs", "inference", "training", "items/s", "MACs by module",
                   "model.blocks.*.attn [direct]"):
        assert needle in table, needle
    saved = json.loads(out.read_text())
    assert REPORT_KEYS <= set(saved) and MACHINE_KEYS <= set(saved["machine"])
    assert saved["task"] == "classification" and saved["input"]["batch_size"] == 6  # from the datamodule
    assert saved["input"]["shape"] == [[6, 3, 16, 16]]
    assert saved["params"]["total"] == sum(p.numel() for p in module.parameters()) == report["params"]["total"]
    _check_measured(saved["inference"], 6)
    _check_measured(saved["train"], 6)
    assert "training_loss" in saved["train"]["what"] and saved["train"]["optimizer"].startswith("AdamW")

    # MACs from the formula: 2x2 patch tokens + class token = 5 tokens, C = 32, 4 agents
    N, P, C, n = 5, 4, 32, 4
    patch = P * (3 * 8 * 8) * C
    proj = N * C * C
    block = N * C * 3 * C + proj + 2 * N * C * 4 * C  # qkv, proj, MLP (ratio 4)
    attn = 2 * n * N * C + 2 * N * n * C  # agent aggregation (A Kᵀ, S1 V) + broadcast (Q Aᵀ, S2 V_A)
    dwc = P * C * 9
    head = C * 10
    assert saved["macs"]["per_item"] == patch + block + attn + dwc + head
    assert saved["macs"]["per_batch"] == 6 * saved["macs"]["per_item"]
    rows = {r["module"]: r["macs"] for r in saved["macs_breakdown"]}
    # the depthwise conv runs inside the core's agent function (from the layer's weights): the layer's own work
    # (and the output projection, which the core function applies from the layer's weights)
    assert rows["model.blocks.*.attn [direct]"] == attn + dwc + proj and "model.blocks.*.attn.dwc" not in rows
    assert "model.blocks.*.attn.proj" not in rows
    assert sum(rows.values()) <= saved["macs"]["per_item"]
    assert sum(rows.values()) == saved["macs"]["per_item"]  # every MAC attributed exactly once


def test_img_size_override_rebuilds_the_model_and_inference_only_mode():
    from agentlit.tasks import ClassificationModule

    module = ClassificationModule(**TINY_DEIT)
    small = profile_module(None, module, None, batch_size=2, img_size=16, mode="inference", steps=1, warmup=0, verbose=False)
    big = profile_module(None, module, None, batch_size=2, img_size=32, mode="inference", steps=1, warmup=0, verbose=False)
    assert "train" not in big and big["input"]["shape"] == [[2, 3, 32, 32]]
    assert big["macs"]["per_item"] > 3 * small["macs"]["per_item"]  # 16 patch tokens instead of 4
    assert module.hparams.img_size == 16  # the configured module itself is left as it was


def test_agent_deit_tiny_224_macs_match_the_paper():
    from agentlit.tasks import ClassificationModule

    module = ClassificationModule(model_name="agent_deit_tiny", num_classes=1000, img_size=224)
    report = profile_module(None, module, None, batch_size=1, mode="inference", steps=1, warmup=0, threads=1, verbose=False)
    macs = report["macs"]["per_item"]
    assert abs(macs / 1.2e9 - 1) < 0.05, macs  # paper: 1.2G FLOPs (the official count is 1.17G MACs)
    assert report["params"]["total"] / 1e6 == pytest.approx(6.0, abs=0.05)
    rows = report["macs_breakdown"]
    assert sum(r["macs"] for r in rows) <= macs and rows[0]["module"].startswith("model.blocks.*.")
    assert {r["module"]: r["instances"] for r in rows}["model.blocks.*.attn [direct]"] == 12


def test_profile_segmentation_module():
    from agentlit.tasks import SegmentationModule

    module = SegmentationModule(
        backbone="agent_pvt_tiny", num_classes=6, neck_channels=16, head_channels=16,
        backbone_kwargs=dict(img_size=32, embed_dims=[8, 16, 32, 64], num_heads=[1, 1, 2, 2], depths=[1, 1, 1, 1],
                             mlp_ratios=[2, 2, 2, 2], agent_num=[4, 4, 4, 1]),
    )
    report = profile_module(None, module, None, batch_size=2, steps=1, warmup=1, threads=1, verbose=False)
    assert report["task"] == "segmentation" and report["model"] == "agent_pvt_tiny"
    assert report["input"]["img_size"] == [32, 32]  # from backbone_kwargs
    _check_measured(report["inference"], 2)
    _check_measured(report["train"], 2)
    assert any(r["module"].startswith("model.decode_head") for r in report["macs_breakdown"])


def test_profile_generation_times_images_and_denoising_steps(tmp_path):
    from agentlit.tasks import GenerationModule

    module = GenerationModule(num_inference_steps=2, height=32, width=32, output_dir=str(tmp_path),
                              agentsd=dict(ratio=0.4, agent_ratio=0.95, sx=2, sy=2, agent_steps=2))
    report = profile_module(None, module, None, batch_size=2, steps=1, warmup=0, threads=1, verbose=False)
    assert report["task"] == "generation" and "training-free" in report["train"]["skipped"]
    assert report["input"]["img_size"] == [32, 32] and report["agentsd"]["agent_ratio"] == 0.95
    _check_measured(report["inference"], 2)
    step = report["inference"]["steps"]["denoising step"]  # the UNet, from timed_modules()
    assert step["calls_per_inference"] >= 2 and 0 < step["time_per_call_s"] < report["inference"]["step_time_s"]["median"]
    assert 0 < step["share_of_time"] <= 1
    m = report["macs"]
    per_step = m["per_call_per_item"]["denoising step"]
    assert m["per_item"] > step["calls_per_inference"] * per_step > 0  # + text encoder, VAE
    assert any(r["module"].startswith("unet.") for r in report["macs_breakdown"])
    assert "denoising step" in format_report(report)

    small = profile_module(None, module, None, batch_size=1, img_size=16, mode="inference", steps=1, warmup=0,
                           verbose=False)
    assert small["input"]["img_size"] == [16, 16] and small["macs"]["per_item"] < m["per_item"]
    assert module.hparams.height == module.hparams.width == 32  # the size is a call setting, hparams untouched


# ----------------------------------------------------------------------------- tasks outside agentlit
class _Regressor(TaskModule):
    """A task outside agentlit, profiled through the task protocol alone (default inference step)."""

    task_name = "regression"

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Linear(width, 1)

    def forward(self, x):
        return self.net(x)

    def example_batch(self, batch_size, img_size=None):
        return torch.randn(batch_size, self.hparams.width), torch.randn(batch_size, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Refiner(TaskModule):
    """A multi-step, inference-only task: ``x <- x + step(x)``, ``num_steps`` times, then a readout."""

    task_name = "refinement"

    def __init__(self, num_steps: int = 3, dim: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.step, self.readout = nn.Linear(dim, dim), nn.Linear(dim, 2)

    def example_batch(self, batch_size, img_size=None):
        return torch.randn(batch_size, self.hparams.dim)

    def inference_step(self, batch):
        x = batch
        for _ in range(self.hparams.num_steps):
            x = x + self.step(x)
        return self.readout(x)

    def training_loss(self, batch):
        raise NotImplementedError("the refiner is inference-only")

    def timed_modules(self):
        return {"refinement step": self.step}


def test_custom_task_uses_its_batch_and_optimizer_and_really_steps():
    module = _Regressor()
    before = module.net.weight.detach().clone()
    report = profile_module(None, module, None, batch_size=4, steps=2, warmup=1, verbose=False)
    assert report["task"] == "regression" and report["model"] == "_Regressor"
    assert report["macs"]["per_item"] == 8 and report["input"]["shape"] == [[4, 8]]
    assert report["input"]["img_size"] is None  # a task without an image size
    assert report["train"]["optimizer"].startswith("SGD") and "_Regressor.training_loss" in report["train"]["what"]
    _check_measured(report["train"], 4)
    assert not torch.equal(before, module.net.weight)  # forward + loss + backward + optimiser step ran


def test_custom_multi_step_task_gets_per_step_times_and_macs_and_skipped_training():
    module = _Refiner(num_steps=3, dim=4)
    report = profile_module(None, module, None, batch_size=5, verbose=False)  # defaults: 3 timed runs, 1 warm-up
    assert report["macs"]["per_item"] == 3 * 4 * 4 + 4 * 2  # naive count: three 4x4 linears, one 4x2
    assert report["macs"]["per_call_per_item"] == {"refinement step": 4 * 4}
    assert {r["module"]: (r["macs"], r["instances"]) for r in report["macs_breakdown"]} == {
        "step": (48, 1), "readout": (8, 1)}
    steps = report["inference"]["steps"]["refinement step"]
    assert steps["calls_per_inference"] == 3 and steps["time_per_call_s"] > 0 and 0 < steps["share_of_time"] <= 1
    assert len(report["inference"]["step_time_s"]["runs"]) == 3
    assert report["train"] == {"skipped": "the refiner is inference-only"}
    table = format_report(report)
    assert "refinement step" in table and "skipped: the refiner is inference-only" in table

    module.timed_modules = lambda: {"refinement step": nn.Linear(4, 4)}  # a module the inference never calls
    report = profile_module(None, module, None, batch_size=1, mode="inference", steps=1, warmup=0, verbose=False)
    assert report["macs"]["per_call_per_item"] == {}
    assert report["inference"]["steps"]["refinement step"]["time_per_call_s"] is None
    assert "'refinement step'] (Linear) is not called by _Refiner.inference_step" in format_report(report)


def test_every_exported_task_implements_the_protocol():
    import inspect

    import agentlit.tasks

    tasks = [obj for name in agentlit.tasks.__all__
             if inspect.isclass(obj := getattr(agentlit.tasks, name)) and issubclass(obj, L.LightningModule)]
    assert {"ClassificationModule", "SegmentationModule", "GenerationModule"} <= {c.__name__ for c in tasks}
    for cls in tasks:
        assert issubclass(cls, TaskModule), cls
        assert cls.example_batch is not TaskModule.example_batch and cls.task_name != TaskModule.task_name, cls


def test_profiler_talks_only_to_the_task_protocol():
    tree = ast.parse((ROOT / "agentlit" / "profiling.py").read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert imported and not [m for m in imported if "tasks" in m]
    assert "_run_info" not in (ROOT / "agentlit" / "profiling.py").read_text()


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="mode='fast' must be one of"):
        profile_module(None, _Regressor(), mode="fast")
    with pytest.raises(ValueError, match="steps=0 must be >= 1"):
        profile_module(None, _Regressor(), steps=0)
    with pytest.raises(ValueError, match="img_size=0 must be >= 1"):
        profile_module(None, _Regressor(), img_size=0)

    class Plain(L.LightningModule):
        def forward(self, x):
            return x

    with pytest.raises(ValueError, match=r"needs the task protocol.*subclass agentlit.tasks.base.TaskModule"):
        profile_module(None, Plain(), verbose=False)

    class NoExample(TaskModule):
        pass

    with pytest.raises(ValueError, match=r"NoExample does not define example_batch"):
        profile_module(None, NoExample(), verbose=False)


def test_cli_profile_help_lists_the_options(capsys):
    from agentlit.cli import cli

    with pytest.raises(SystemExit) as exit_:
        cli(["profile", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--batch_size", "--img_size", "--mode", "--steps", "--warmup", "--threads", "--output", "--config"):
        assert opt in text, opt
    assert "inference,train,both" in text


def test_fit_keeps_lightnings_profiler(tmp_path, monkeypatch):
    import io
    import logging

    from agentlit.cli import cli

    monkeypatch.setenv("AGENTLIT_RUN_VERSION", "0")
    monkeypatch.chdir(tmp_path)
    log, stream = logging.getLogger("lightning.pytorch"), io.StringIO()
    handler = logging.StreamHandler(stream)  # Lightning logs the profiler report at INFO
    log.addHandler(handler)
    try:
        cli(["fit", "--config", QUICKSTART, "--model.model_kwargs", "{patch_size: 8, depth: 1, agent_num: 4, embed_dim: 32, num_heads: 2}",
             "--model.img_size", "16", "--data.img_size", "16", "--trainer.enable_progress_bar", "false",
             "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.profiler", "simple",
             "--trainer.default_root_dir", str(tmp_path / "runs")])
    finally:
        log.removeHandler(handler)
    assert "FIT Profiler Report" in stream.getvalue() and "run_training_batch" in stream.getvalue()


@pytest.mark.slow
def test_cli_profile_quickstart_writes_json(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    out = tmp_path / "tmp.json"
    proc = subprocess.run(
        [sys.executable, "-m", "agentlit", "profile", "--config", QUICKSTART, "--steps", "2", "--warmup", "1",
         "--threads", "1", "--output", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MACs by module" in proc.stdout and "items/s" in proc.stdout
    report = json.loads(out.read_text())
    assert REPORT_KEYS <= set(report)
    import yaml

    config = yaml.safe_load(open(QUICKSTART))  # the shapes come from the same YAML fit uses
    batch, size = config["data"]["init_args"]["batch_size"], config["data"]["init_args"]["img_size"]
    assert report["input"]["shape"] == [[batch, 3, size, size]]
    assert report["model_kwargs"]["depth"] == config["model"]["init_args"]["model_kwargs"]["depth"]
    assert report["train"]["what"].endswith("grad clip (norm 5.0)")  # the config's trainer.gradient_clip_val
    assert report["machine"]["torch_threads"] == 1
    assert not (tmp_path / "runs").exists()  # a measurement writes no run folder


@pytest.mark.parametrize("config, task", [("segmentation/quickstart.yaml", "segmentation"),
                                          ("generation/quickstart.yaml", "generation")])
def test_cli_profile_segmentation_and_generation_quickstarts(tmp_path, monkeypatch, config, task):
    from agentlit.cli import cli

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "profile.json"
    cli(["profile", "--config", str(ROOT / "configs" / config), "--batch_size", "2", "--steps", "1", "--warmup", "0",
         "--threads", "1", "--output", str(out)])
    report = json.loads(out.read_text())
    import yaml

    init = yaml.safe_load(open(ROOT / "configs" / config))["model"]["init_args"]
    size = init["backbone_kwargs"]["img_size"] if task == "segmentation" else init["height"]
    assert report["task"] == task and report["input"]["batch_size"] == 2 and report["input"]["img_size"] == [size, size]
    _check_measured(report["inference"], 2)
    assert report["macs"]["per_item"] > 0
    if task == "generation":
        assert "skipped" in report["train"]
        assert report["inference"]["steps"]["denoising step"]["calls_per_inference"] >= init["num_inference_steps"]
    else:
        _check_measured(report["train"], 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile.json"]  # no run folder, no images


# ----------------------------------------------------------------------------- benchmarks/run_all.py
def _run_all_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_run_all_report_is_generated_from_the_json_files(tmp_path):
    run_all = _run_all_module()
    machine = {"cpu": "Test CPU 9000", "cores": 8, "torch_threads": 4, "torch": "9.9.9", "device": "cpu"}
    attention_rows = [
        {"impl": impl, "tokens": n, "fwd_ms": f, "fwd_bwd_ms": 3 * f, "fwd_peak_mib": m, "fwd_bwd_peak_mib": 2 * m}
        for impl, n, f, m in [("agent", 196, 1.5, 0.5), ("agent", 3136, 4.0, 6.0), ("sdpa", 196, 1.0, 0.2), ("sdpa", 3136, 40.0, 3.0)]
    ]
    (tmp_path / "attention.json").write_text(json.dumps({
        "benchmark": "attention", "machine": machine, "device": "cpu", "dtype": "float32",
        "config": {"agents": 49, "heads": 4, "head_dim": 64}, "rows": attention_rows,
        "summary": [{"tokens": 3136, "sdpa_over_agent_fwd": 10.0, "sdpa_over_agent_fwd_bwd": 10.0,
                     "naive_over_agent_fwd": None, "sdpa_over_agent_fwd_bwd_memory": 0.5, "cost_model": 32.0}]}))
    (tmp_path / "models.json").write_text(json.dumps({
        "settings": {"batch_size": 4, "img_size": 224, "torch": "9.9.9", "machine": "x86_64", "cpu_count": 8, "threads": 1},
        "results": {"agent_pvt_small": {"model": "agent_pvt_small", "infer_images_per_s": 4.2, "train_images_per_s": 1.4},
                    "pvt_v1_large": {"model": "pvt_v1_large", "infer_images_per_s": 2.0, "train_images_per_s": 0.7}},
        "ratios": [{"agent": "agent_pvt_small", "baseline": "pvt_v1_large", "infer_speedup": 2.1, "paper_cpu_speedup": 2.1,
                    "train_speedup": 2.0}]}))
    (tmp_path / "agentsd_cpu.json").write_text(json.dumps({
        "benchmark": "agentsd", "machine": machine, "device": "cpu", "dtype": "float32", "config": {"steps": 2},
        "rows": [{"size": 256, "setting": s, "time_per_image_s": t, "time_per_step_s": t / 2, "peak_mem_mib": None}
                 for s, t in (("baseline", 8.0), ("agentsd", 5.0))],
        "summary": [{"size": 256, "speedup_agentsd": 1.6}]}))
    (tmp_path / "profile_tiny.json").write_text(json.dumps({
        "model": "agent_deit_tiny", "model_kwargs": {}, "input": {"batch_size": 8, "img_size": [224, 224]},
        "params": {"total": 6_015_640}, "macs": {"per_item": 1_167_877_632},
        "inference": {"items_per_s": 50.0, "memory": {"peak_mib": 20.0}}, "machine": machine}))
    (tmp_path / "run_all.json").write_text(json.dumps({"attention": [{
        "command": "python benchmarks/attention.py --tokens 196 3136", "output": "attention.json", "returncode": 0,
        "started_utc": "2030-01-01T00:00:00+00:00", "wall_s": 12.0, "quick": True, "machine": {**machine, "loadavg_1m": 0.5}}],
        "models": [{"command": "python benchmarks/models.py", "output": "models.json", "returncode": 3,
                    "started_utc": "2030-01-01T00:01:00+00:00", "wall_s": 1.0, "quick": True, "machine": machine,
                    "log_tail": "RuntimeError: out of memory"}]}))

    report = run_all.build_report(tmp_path, command="python benchmarks/run_all.py --report-only")
    text = report.read_text()
    assert text.startswith("# Benchmark report") and "--report-only" in text
    for png in ("report_attention.png", "report_models.png", "report_agentsd_cpu.png"):
        assert f"]({png})" in text and (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    # numbers come from the JSON, machines from the manifest / the JSON itself
    assert "| 3136 | sdpa | 40 | 120 | 3 | 6 |" in text
    assert "SDPA / agent time 10.00× (fwd+bwd), memory 0.50× (cost model N/(2n) = 32.0)" in text
    assert "agent_pvt_small vs pvt_v1_large: inference speed-up 2.10× (paper, desktop CPU: 2.1×), training 2.00×" in text
    assert "AgentSD at 256 px (steps=2): 1.60× vs SD" in text
    assert "agent_deit_tiny at 224×224: 6.02M parameters, 1.168 GMACs per image, 50.0 img/s inference" in text
    assert text.count("CPU Test CPU 9000, 8 cores, 4 torch threads, torch 9.9.9, device cpu") >= 3
    assert "load avg 0.5 at start" in text and "(quick settings), 12.0 s" in text
    assert "## Failed runs" in text and "exited 3" in text and "out of memory" in text


def test_run_all_cli_rejects_unknown_benchmark_args(tmp_path):
    run_all = _run_all_module()
    with pytest.raises(SystemExit):
        run_all.main(["--report-only", "--args", "nosuch=--x 1", "--results-dir", str(tmp_path)])
    report = run_all.main(["--report-only", "--results-dir", str(tmp_path)])  # empty folder: a report that says so
    assert report.read_text().startswith("# Benchmark report")
