"""Repository promises: README ⇄ CI command, every shipped config parses."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

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
