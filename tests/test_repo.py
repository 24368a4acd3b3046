"""Repository promises: README ⇄ CI command, every shipped config parses."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def readme_quickstart() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S) for line in block.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_readme_has_exactly_two_quickstart_commands_and_ci_runs_the_test_one():
    commands = readme_quickstart()
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert "agentlit fit --config configs/quickstart.yaml" in main_job
    assert "pytest" in tests
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci == [tests], "'.ci/run' must run exactly the README's test command"


CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "strategies" not in p.parts)


@pytest.mark.parametrize("config", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_config_parses(config, capsys):
    """Every key of every shipped config is one the CLI knows (typos fail here, not on a cluster)."""
    from agentlit.cli import cli

    with pytest.raises(SystemExit) as exit_info:
        cli(["--config", str(config), "--print_config"], run=False)
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    assert "class_path" in capsys.readouterr().out


OVERLAYS = sorted((ROOT / "configs" / "strategies").glob("*.yaml"))


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[p.name for p in OVERLAYS])
def test_strategy_overlay_parses_on_top_of_a_task_config(overlay, capsys):
    from agentlit.cli import cli

    base = ROOT / "configs" / "classification" / "agent_deit_tiny_imagenet.yaml"
    with pytest.raises(SystemExit) as exit_info:
        cli(["--config", str(base), "--config", str(overlay), "--print_config"], run=False)
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "strategy" in printed and "agent_deit_tiny" in printed


def test_launch_scripts_are_valid_bash():
    import subprocess

    for script in (ROOT / "scripts" / "slurm" / "train.sbatch", ROOT / "scripts" / "torchrun.sh"):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script


def test_fsdp_wrap_policy_wraps_each_block():
    import timm

    from agentlit.utils.fsdp import wrap_transformer_blocks

    from torch.distributed.fsdp.wrap import _recursive_wrap

    model = timm.create_model("agent_pvt_tiny", embed_dims=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2])
    wrapped = [name for name, m in model.named_modules() if wrap_transformer_blocks(m, recurse=False, nonwrapped_numel=0)]
    assert wrapped == ["block1.0", "block2.0", "block3.0", "block4.0"]

    class Unit(torch.nn.Module):  # stands in for FullyShardedDataParallel: marks what FSDP would wrap
        def __init__(self, module: torch.nn.Module, **kwargs) -> None:
            super().__init__()
            self.inner = module

    # FSDP's own traversal with our policy: it must descend through the stage containers to the blocks.
    _recursive_wrap(model, wrap_transformer_blocks, Unit, ignored_modules=set(), ignored_params=set(),
                    only_wrap_children=True)
    units = [name for name, m in model.named_modules() if isinstance(m, Unit)]
    assert units == ["block1.0", "block2.0", "block3.0", "block4.0"]


def test_readme_model_table_is_the_generated_one():
    """The README carries docs/model_table.md as scripts/model_table.py wrote it (no hand edits)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("model_table", ROOT / "scripts" / "model_table.py")
    model_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_table)
    generated = model_table.readme_block((ROOT / "docs" / "model_table.md").read_text())
    readme = (ROOT / "README.md").read_text()
    block = readme.split(model_table.README_START, 1)[1].split(model_table.README_END, 1)[0].strip()
    assert block == generated
    for name in model_table.PAPER:
        assert f"`{name}`" in block


def test_repository_stands_on_its_own():
    """No file points outside the repository: no sibling reference folder, no reference file that is not
    shipped (facts live in docs/reference.md and tests/data/)."""
    import subprocess

    # Built from pieces so that this file does not match itself.
    forbidden = ["../" + "shared", "shared" + "/paper", "REFERENCE" + ".md", "REFERENCE" + " §"]
    if (ROOT / ".git").exists():
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.splitlines()
        files = [ROOT / f for f in listed if (ROOT / f).is_file()]
    else:
        files = [p for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts and "egg-info" not in str(p)]
    assert len(files) > 50, "file listing failed"
    hits = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary files (images, checkpoints)
        for needle in forbidden:
            for lineno, line in enumerate(text.splitlines(), 1):
                if needle in line:
                    hits.append(f"{path.relative_to(ROOT)}:{lineno}: {needle}")
    assert not hits, "files that point outside the repository (put the facts in docs/reference.md or tests/data/):\n" \
                     + "\n".join(hits[:20])


def test_every_bad_input_row_names_test_files_that_exist():
    """Each row of the README's "Bad input" table names the test file(s) that try it."""
    section = (ROOT / "README.md").read_text().split("## Bad input", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith(("| input", "|---"))]
    assert len(rows) > 40, rows
    for row in rows:
        named = re.findall(r"`(test_\w+\.py)`", row.rsplit("|", 2)[1])
        assert named, f"row names no test file: {row[:80]}"
        for name in named:
            assert (ROOT / "tests" / name).is_file(), f"{name} (named in the README's Bad input table) does not exist"
