"""The benchmark scripts run end to end (timings are never asserted: speed lives in benchmarks/)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_gpu_check_dry_run_writes_every_result(tmp_path):
    """benchmarks/gpu_check.sh --dry-run: every step of the GPU check on the CPU at tiny sizes."""
    out = tmp_path / "gpu_check"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    for step in ("quickstart", "attention", "models", "agentsd", "scaling"):
        assert f"{step}: rc=0 " in summary, summary + (out / f"{step}.log").read_text()[-3000:]
    assert "device: cpu, dry-run: 1" in summary
    assert list((out / "quickstart").rglob("*.ckpt")), "the quickstart fit wrote no checkpoint"
    models = json.loads((out / "models.json").read_text())
    assert {"agent_deit_tiny", "agent_deit_tiny@bf16", "deit_tiny_patch16_224@bf16"} <= set(models["results"])
    assert "infer_speedup_bf16" in models["ratios"][0]
    sd = json.loads((out / "agentsd_unet.json").read_text())
    settings = {r["setting"] for r in sd["rows"]}
    assert {"baseline", "agentsd", "tome", "ceiling"} <= settings
    assert all(r["time_per_step_s"] > 0 for r in sd["rows"])
    assert json.loads((out / "attention.json").read_text())
    scaling = json.loads((out / "scaling.json").read_text())
    assert scaling["settings"]["bf16"] and [r["pair"] for r in scaling["results"]] == ["deit"]
    row = scaling["results"][0]
    assert row["mac_ratio"] > 0 and row["infer_speed_ratio"] > 0 and row["train_speed_ratio"] > 0
    assert row["agent_train_peak_mib"] > 0 and row["baseline_train_peak_mib"] > 0


def test_agentsd_unet_benchmark_tiny(tmp_path):
    """benchmarks/agentsd.py --unet on the tiny SDXL-shaped UNet: every setting measured, the ceiling
    removes the patched level's self-attention, the 50-step estimate is reported."""
    out = tmp_path / "sd.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "benchmarks/agentsd.py", "--unet", "--arch", "tiny-sdxl", "--sizes", "64",
                           "--repeats", "1", "--warmup", "0", "--device", "cpu", "--no-cpu-memory",
                           "--unet-settings", "baseline", "agentsd", "shared", "tome", "ceiling", "deeper", "mlp",
                           "--output", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["arch"] == "tiny-sdxl"
    settings = [r["setting"] for r in report["rows"]]
    assert settings == ["baseline", "agentsd", "shared", "tome", "ceiling", "deeper", "mlp"]
    assert "estimated_50_steps_speedup_agentsd" in report["summary"][0]
    assert {"speedup_deeper", "speedup_mlp"} <= set(report["summary"][0])


def test_opt_in_settings_patch_what_they_say():
    """``deeper`` adds the next level's blocks to the default patch; ``mlp`` hooks the patched blocks' MLPs."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from agentsd import configure_unet
    finally:
        sys.path.pop(0)
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    from agentlit.diffusion import get_state, tiny_sdxl_unet_config

    unet = UNet2DConditionModel(**tiny_sdxl_unet_config())
    saved: dict = {}
    configure_unet(unet, "agentsd", SimpleNamespace(ratio=0.5), saved)
    assert get_state(unet).config.max_downsample is None and not get_state(unet).config.merge_mlp
    configure_unet(unet, "deeper", SimpleNamespace(ratio=0.5), saved)
    assert get_state(unet).config.max_downsample == 4  # SDXL: the 2x level (default) and the 4x level
    configure_unet(unet, "mlp", SimpleNamespace(ratio=0.5), saved)
    assert get_state(unet).config.merge_mlp and get_state(unet).config.max_downsample is None
    configure_unet(unet, "baseline", SimpleNamespace(ratio=0.5), saved)
    assert get_state(unet) is None


def test_ceiling_removes_exactly_the_default_patch_level():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from agentsd import finest_attention_blocks
    finally:
        sys.path.pop(0)
    from diffusers import UNet2DConditionModel

    from agentlit.diffusion import apply_patch, get_state, remove_patch, tiny_sdxl_unet_config, tiny_unet_config

    for cfg, level in ((tiny_unet_config(), 0), (tiny_sdxl_unet_config(), 1)):
        unet = UNet2DConditionModel(**cfg)
        blocks = finest_attention_blocks(unet)
        expected = [m for part in (unet.down_blocks[level], unet.up_blocks[len(unet.up_blocks) - 1 - level])
                    for m in part.modules() if type(m).__name__ == "BasicTransformerBlock"]
        assert blocks == expected and blocks
        apply_patch(unet)
        assert get_state(unet) is not None
        remove_patch(unet)


def test_core_rates_times_every_agent_layer_shape(tmp_path):
    """benchmarks/core_rates.py finds the op's layer shapes from a real forward pass and times each (core,
    its products alone, the two flash calls without and with biases, the softmax reference), with the MACs of
    the paper's cost model."""
    out = tmp_path / "rates.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "core_rates.py", "--models", "agent_deit_tiny", "--sizes", "112:2",
                           "--repeats", "1", "--warmup", "0", "--inner", "1", "--output", str(out)],
                          cwd=ROOT / "benchmarks", env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = json.loads(out.read_text())["results"]  # Agent-DeiT-T: one layer shape, 12 layers
    assert {k: row[k] for k in ("B", "H", "N", "M", "d", "n", "layers")} == dict(B=2, H=3, N=50, M=50, d=64, n=49, layers=12)
    assert row["mac_ratio_vs_softmax"] == 50 * 50 / (49 * (50 + 50))
    for name in ("core", "products", "flash", "flash_biases", "softmax"):
        assert row[f"{name}_ms"] > 0 and row[f"{name}_gmacs_per_s"] > 0
    assert row["core_over_products"] == row["core_ms"] / row["products_ms"]
    assert row["core_over_flash_biases"] == row["core_ms"] / row["flash_biases_ms"]


def test_core_rates_refuses_a_model_that_is_not_an_agent_model(tmp_path):
    proc = subprocess.run([sys.executable, "core_rates.py", "--models", "deit_tiny_patch16_224", "--output",
                           str(tmp_path / "x.json")], cwd=ROOT / "benchmarks", capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert "deit_tiny_patch16_224: not a registered agent model" in proc.stderr
    assert "agent_deit_tiny" in proc.stderr and "Traceback" not in proc.stderr


def test_scaling_stand_ins_run_the_core_bias_free_by_flash_calls_and_for_free(monkeypatch):
    """benchmarks/scaling.py --ceiling: the "flash" stand-in is agent attention without position biases (the
    real op with no biases, forward and gradients), the "free" one O = Q; both keep the local term and the
    projection, and with no stand-in set the switch is the real op."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import scaling
    finally:
        sys.path.pop(0)
    import torch

    from agentlit.core import functional

    real = functional.agent_attention_fused
    monkeypatch.setattr(functional, "agent_attention_fused", real)  # restored after the test
    scaling._install_core_switch()
    switch = functional.agent_attention_fused
    torch.manual_seed(0)
    B, H, N, n, d = 2, 2, 16, 4, 8
    q, k, v, agents = (torch.randn(B, H, m, d, requires_grad=True) for m in (N, N, N, n))
    kw = dict(dwc_weight=torch.randn(H * d, 1, 3, 3), dwc_bias=torch.randn(H * d), layout=[4, 4],
              proj_weight=torch.randn(5, H * d), proj_bias=torch.randn(5))
    biases = (torch.randn(1, H, n, N), torch.randn(1, H, N, n))

    def grads(fn):
        out = fn()
        return [out, *torch.autograd.grad(out.square().sum(), (q, k, v, agents))]

    expected = grads(lambda: real(q, k, v, agents, None, None, 0.3, 0.2, **kw))
    flash = grads(scaling._with_stand_in("flash", lambda: switch(q, k, v, agents, *biases, 0.3, 0.2, **kw)))
    for got, want in zip(flash, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    free = scaling._with_stand_in("free", lambda: switch(q, k, v, agents, *biases, 0.3, 0.2, **kw))()
    identity = dict(kw, dwc_weight=None, dwc_bias=None, proj_weight=None, proj_bias=None)
    local = functional.depthwise_local(v.transpose(1, 2).reshape(B, N, H * d), [4, 4], kw["dwc_weight"], kw["dwc_bias"])
    x = q.transpose(1, 2).reshape(B, N, H * d) + local
    torch.testing.assert_close(free, torch.nn.functional.linear(x, kw["proj_weight"], kw["proj_bias"]))
    assert scaling._STAND_IN == [None]
    torch.testing.assert_close(switch(q, k, v, agents, *biases, 0.3, 0.2, **identity),
                               real(q, k, v, agents, *biases, 0.3, 0.2, **identity))


def test_scaling_ceiling_reports_both_ceilings(tmp_path):
    """benchmarks/scaling.py --ceiling end to end on one small pair: both ceilings in the JSON and the table."""
    out = tmp_path / "scaling.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "scaling.py", "--pairs", "deit", "--sizes", "112:1", "--repeats", "1",
                           "--warmup", "0", "--ceiling", "--output", str(out)],
                          cwd=ROOT / "benchmarks", env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = json.loads(out.read_text())["results"]
    for mode in ("infer", "train"):
        for kind in ("flash", "ceiling"):
            assert row[f"{kind}_{mode}_s"] > 0
            assert row[f"{mode}_{kind}_efficiency"] == row[f"baseline_{mode}_s"] / row[f"{kind}_{mode}_s"] / row["mac_ratio"]
    assert "flash_train_peak_mib" not in row and row["agent_train_peak_mib"] > 0
    assert "; flash " in proc.stdout and ", free " in proc.stdout


def test_scaling_checks_every_cell_against_the_targets():
    """benchmarks/scaling.py's target summary: efficiency ≥ 90% (training) and ≥ 95% (inference) at the
    classification sizes, memory ≤ the baseline's (≤ 1.1× at 224²), detection speed ratios ≥ 1.0; a miss
    names the stand-in columns below the same target (detection: efficiency × MAC ratio)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import scaling
    finally:
        sys.path.pop(0)
    rows = [
        dict(size="224", pair="deit", mac_ratio=1.07, train_speed_ratio=0.98, train_efficiency=0.98 / 1.07,
             train_flash_efficiency=0.93, train_ceiling_efficiency=1.05, infer_speed_ratio=1.03,
             infer_efficiency=1.03 / 1.07, train_memory_ratio=1.05, train_efficiency_quartiles=[0.86, 0.95]),
        dict(size="448", pair="pvt", mac_ratio=1.07, train_speed_ratio=0.90, train_efficiency=0.84,
             train_flash_efficiency=0.94, train_ceiling_efficiency=1.07, infer_speed_ratio=0.86, infer_efficiency=0.80,
             infer_flash_efficiency=0.89, infer_ceiling_efficiency=0.94, train_memory_ratio=1.05,
             infer_efficiency_quartiles=[0.75, 0.83]),
        dict(size=scaling.DETECTION, pair="swin", mac_ratio=0.94, train_speed_ratio=0.91, train_efficiency=0.97,
             train_flash_efficiency=1.03, train_ceiling_efficiency=1.19, infer_speed_ratio=1.02, infer_efficiency=1.09,
             train_memory_ratio=0.85, train_efficiency_quartiles=[0.9, 1.1]),
    ]
    summary = scaling.targets(rows)
    cells = {(c["size"], c["kind"]): c for c in summary["cells"]}
    assert cells[("224", "train")]["met"] and cells[("224", "infer")]["met"]
    assert cells[("224", "memory")]["met"] and not cells[("448", "memory")]["met"]  # 1.05: within 1.1× only at 224²
    assert not cells[("448", "train")]["met"] and cells[("448", "train")]["out_of_reach"] == []
    assert cells[("448", "infer")]["out_of_reach"] == ["flash", "free"]
    detection = cells[(scaling.DETECTION, "detection_train")]
    # speed ratios of the stand-ins: flash 1.03 × 0.94 < 1 ≤ free 1.19 × 0.94
    assert not detection["met"] and detection["out_of_reach"] == ["flash"]
    assert cells[(scaling.DETECTION, "detection_infer")]["met"]
    assert (scaling.DETECTION, "memory") not in cells  # detection memory is reported, not a target
    assert summary["met"] == dict(train=[1, 2], infer=[1, 2], memory=[1, 2], detection_train=[0, 1], detection_infer=[1, 1])
    # the rounds' quartiles: a target between them is not settled by the run, met or not
    assert cells[("224", "train")]["settled"] is False and cells[("224", "train")]["quartiles"] == [0.86, 0.95]
    assert cells[("448", "infer")]["settled"] is True  # 75–83%: below 95% in every round
    assert "settled" not in cells[("448", "train")]  # no rounds recorded
    assert detection["quartiles"] == [0.846, 1.034] and detection["settled"] is False  # efficiency quartiles × MAC ratio
    text = scaling.targets_text(summary)
    assert ("training ≥ 90% of the limit: 1 of 2 (missed: pvt 448² 84%); target between the quartiles of the rounds: "
            "deit 224² 92% (86–95%)") in text
    assert "detection training ≥ 1.0×: 0 of 1 (missed: swin 800×1344 0.91×, flash below it too); target between the " \
           "quartiles of the rounds: swin 800×1344 0.91× (0.85–1.03×)" in text
    assert "inference ≥ 95% of the limit: 1 of 2 (missed: pvt 448² 80%, flash and free below it too)\n" in text
    assert "pvt 448² 80%, flash and free below it too" in text


def test_scaling_pools_the_rounds_of_several_processes():
    """benchmarks/scaling.py --processes: every time-based field comes from the rounds; rows of one cell
    from separate processes merge by pooling their rounds (medians over all of them), keep each process's
    efficiency, and the efficiency quartiles are those of the paired rounds of every process."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import scaling
    finally:
        sys.path.pop(0)

    def run(agent, baseline, free):
        return scaling.summarise(dict(size="224", pair="deit", mac_ratio=2.0, load_before=0.5, load_after=0.7,
                                      infer_rounds_s=dict(agent=agent, baseline=baseline, ceiling=free)))

    first = run([1.0, 1.0, 1.2], [1.8, 2.0, 2.0], [0.5, 0.5, 0.5])
    assert first["agent_infer_s"] == 1.0 and first["infer_speed_ratio"] == 2.0 and first["infer_efficiency"] == 1.0
    assert first["infer_ceiling_efficiency"] == 2.0
    assert first["infer_efficiency_quartiles"] == [0.8667, 0.95]  # rounds 0.9, 1.0, 0.8333: quartiles interpolated
    second = run([2.0, 2.0, 2.0], [2.0, 2.0, 3.0], [1.0, 1.0, 1.0])  # a slower process: each of its rounds leans low
    assert second["infer_efficiency"] == 0.5
    merged = scaling.merge_processes([first, second])
    assert merged["processes"] == 2 and merged["infer_process_efficiencies"] == [1.0, 0.5]
    assert merged["infer_rounds_s"]["agent"] == [1.0, 1.0, 1.2, 2.0, 2.0, 2.0]
    assert merged["agent_infer_s"] == 1.6 and merged["baseline_infer_s"] == 2.0  # medians of the pooled rounds
    # six paired rounds 0.9, 1.0, 0.8333, 0.5, 0.5, 0.75: quartiles 0.5625 and 0.8833
    assert merged["infer_efficiency"] == 2.0 / 1.6 / 2.0 and merged["infer_efficiency_quartiles"] == [0.5625, 0.8833]
    assert merged["load_before"] == 0.5 and merged["load_after"] == 0.7
    assert "train_speed_ratio" not in merged  # a mode without rounds stays unmeasured
