"""Generation task: prompt data, predict (PNGs + timing JSON), FID in test, and the CLI quickstart."""
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
from PIL import Image

from agentlit.data import PromptDataModule
from agentlit.diffusion import AgentSDConfig, get_state
from agentlit.tasks import GenerationModule, RandomConvFeatures

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- prompts
def _items(dm):
    return [dict(zip(b, vals)) for b in dm.predict_dataloader() for vals in zip(*b.values())]


def test_prompt_sources(tmp_path):
    yml = tmp_path / "p.yaml"
    yml.write_text("- a cat\n- a dog\n")
    mapping = tmp_path / "m.yml"
    mapping.write_text("prompts: [a cat, a dog]\n")
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\n# a comment\na dog\n")
    for dm in (PromptDataModule(prompts=["a cat", "a dog"]), PromptDataModule(prompt_file=str(yml)),
               PromptDataModule(prompt_file=str(mapping)), PromptDataModule(prompt_file=str(txt))):
        assert dm.prompts == ["a cat", "a dog"]
    dm = PromptDataModule(imagenet_prompts=2000)
    assert len(dm.prompts) == 2000
    assert dm.prompts[0] == "a photo of a tench" and dm.prompts[1000] == dm.prompts[0]
    assert dm.prompts[999] == "a photo of a toilet tissue"


def test_prompt_batches_and_seeds():
    dm = PromptDataModule(prompts=["a", "b", "c"], images_per_prompt=2, batch_size=4, seed=10)
    batches = list(dm.predict_dataloader())
    assert [len(b["prompt"]) for b in batches] == [4, 2]
    items = _items(dm)
    assert [i["prompt"] for i in items] == ["a", "a", "b", "b", "c", "c"]
    assert [i["seed"] for i in items] == list(range(10, 16))
    assert [i["index"] for i in items] == list(range(6))


def test_prompt_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one of"):
        PromptDataModule(prompts=["a"], imagenet_prompts=3)
    with pytest.raises(ValueError, match="exactly one of"):
        PromptDataModule()
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        PromptDataModule(prompt_file=str(tmp_path / "missing.txt")).prompts
    bad = tmp_path / "bad.yaml"
    bad.write_text("{other: 1}\n")
    with pytest.raises(ValueError, match="`prompts` list"):
        PromptDataModule(prompt_file=str(bad)).prompts


# ----------------------------------------------------------------------------- predict / test
def _trainer():
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)


def _module(tmp_path, **kw):
    args = dict(agentsd=AgentSDConfig(agent_steps=1), num_inference_steps=2, height=32, width=32,
                output_dir=str(tmp_path), warmup=False)
    args.update(kw)
    return GenerationModule(**args)


def test_predict_writes_images_and_timing(tmp_path):
    module = _module(tmp_path / "a")
    assert get_state(module.pipe) is not None
    dm = PromptDataModule(prompts=["a cat", "a dog", "a ship"], batch_size=2)
    _trainer().predict(module, datamodule=dm)
    report = json.loads((tmp_path / "a" / "generation.json").read_text())
    assert report["num_images"] == 3 and report["agentsd"]["agent_steps"] == 1
    assert [r["prompt"] for r in report["images"]] == ["a cat", "a dog", "a ship"]
    assert [r["seed"] for r in report["images"]] == [0, 1, 2]
    assert all(r["time_s"] > 0 for r in report["images"]) and report["mean_time_per_image_s"] > 0
    first = np.asarray(Image.open(tmp_path / "a" / "00000.png"))
    assert first.shape == (32, 32, 3)
    # reproducible: the same module and prompts again give the same images, AgentSD included
    module.hparams.output_dir = str(tmp_path / "b")
    _trainer().predict(module, datamodule=dm)
    for i in range(3):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "b" / f"{i:05d}.png")),
                              np.asarray(Image.open(tmp_path / "a" / f"{i:05d}.png")))
    # the baseline's image for a seed does not depend on the batching
    base1 = _module(tmp_path / "c", agentsd=None)
    _trainer().predict(base1, datamodule=PromptDataModule(prompts=["a cat", "a dog"], batch_size=2))
    base2 = _module(tmp_path / "d", agentsd=None)
    _trainer().predict(base2, datamodule=PromptDataModule(prompts=["a cat"], batch_size=1))
    assert get_state(base1.pipe) is None
    a = np.asarray(Image.open(tmp_path / "c" / "00000.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "d" / "00000.png")).astype(int)
    assert np.abs(a - b).max() <= 1


def test_fid_path_with_local_features(tmp_path):
    """FID of the generated set against itself is ~0; against other images it is clearly larger."""
    prompts = PromptDataModule(prompts=["a cat", "a dog", "a ship", "a tree"], batch_size=2)
    gen = _module(tmp_path / "gen")
    _trainer().predict(gen, datamodule=prompts)
    same = _module(tmp_path / "same", fid_reference_dir=str(tmp_path / "gen"), fid_feature=RandomConvFeatures(16))
    res_same = _trainer().test(same, datamodule=prompts)[0]
    noise = tmp_path / "noise"
    noise.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):  # other sizes on purpose: the loader resizes + centre-crops to 32x32
        Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8)).save(noise / f"{i}.png")
    other = _module(tmp_path / "other", fid_reference_dir=str(noise), fid_feature=RandomConvFeatures(16))
    res_other = _trainer().test(other, datamodule=prompts)[0]
    assert abs(res_same["test/fid"]) < 1e-3 * max(1.0, res_other["test/fid"])
    assert res_other["test/fid"] > 0.01
    report = json.loads((tmp_path / "other" / "test_metrics.json").read_text())
    assert report["metrics"]["test/fid"] == pytest.approx(res_other["test/fid"])
    assert report["num_images"] == 4


def test_generation_bad_args(tmp_path):
    with pytest.raises(ValueError, match="torch_dtype"):
        GenerationModule(torch_dtype="fp16")
    with pytest.raises(ValueError, match="scheduler"):
        GenerationModule(scheduler="plms2", output_dir=str(tmp_path))
    module = _module(tmp_path, fid_reference_dir=str(tmp_path / "nowhere"), fid_feature=RandomConvFeatures(8))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        _trainer().test(module, datamodule=PromptDataModule(prompts=["a", "b"]))


# ----------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_cli_quickstart_predict(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "agentlit", "predict", "--config", str(ROOT / "configs/generation/quickstart.yaml"),
           f"--model.output_dir={out}", "--model.num_inference_steps=2", "--model.height=32", "--model.width=32",
           "--data.init_args.images_per_prompt=1", "--trainer.enable_progress_bar=false"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "generation.json").read_text())
    assert report["num_images"] == 3 and report["agentsd"]["ratio"] == 0.4
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png", "00002.png"]


def test_a_second_predict_never_overwrites_the_first_and_says_where_it_wrote(tmp_path, capsys):
    dm = PromptDataModule(prompts=["a cat", "a dog"], batch_size=2)
    _trainer().predict(_module(tmp_path / "out"), datamodule=dm)
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"agentlit: predict read 2 prompt/seed pairs; wrote 2 images and generation.json to {tmp_path / 'out'}")
    first = (tmp_path / "out" / "00000.png").read_bytes()
    _trainer().predict(_module(tmp_path / "out"), datamodule=dm)
    out = capsys.readouterr().out
    assert f"wrote 2 images and generation.json to {tmp_path / 'out-1'}" in out
    assert (tmp_path / "out" / "00000.png").read_bytes() == first and (tmp_path / "out-1" / "00001.png").is_file()
