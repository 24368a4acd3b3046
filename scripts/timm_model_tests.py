"""Run timm's own model test file (``tests/test_models.py`` of the installed timm version) against
every model agentlit registers, and print pytest's summary.

    python scripts/timm_model_tests.py [--workdir DIR] [-- extra pytest args, e.g. -k torchscript]

The test file comes from timm's source distribution on PyPI (``pip download``), so this needs the
network once; the test suite itself (``tests/test_timm_contract.py``) runs the same checks offline.
timm's file is Apache-2.0 licensed and is used unmodified. Only our names are collected, and
``agent_deit_*`` is classified like timm's ``deit*`` (token output, "non-standard" cfg test).
Takes about 20 minutes on 2 CPU cores (all 20 models at timm's sizes).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

CONFTEST = '''
import fnmatch

import timm

import agentlit  # noqa: F401  (registers our models before timm's test module lists models)

OURS = ("agent_*", "pvt_v1_*", "cswin_*")
_list_models = timm.list_models


def _list_models_deit_alike(filter="", *args, exclude_filters="", **kwargs):
    # timm's test file names deit* among its token-output ("non-standard") models; agent_deit_* is one too
    def widen(patterns):
        if isinstance(patterns, (list, tuple)) and "deit*" in patterns:
            return [*patterns, "agent_deit*"]
        return patterns
    return _list_models(widen(filter), *args, exclude_filters=widen(exclude_filters), **kwargs)


timm.list_models = _list_models_deit_alike


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        name = getattr(getattr(item, "callspec", None), "params", {}).get("model_name")
        (keep if name and any(fnmatch.fnmatch(name, p) for p in OURS) else drop).append(item)
    items[:] = keep
    config.hook.pytest_deselected(items=drop)
'''


def main(argv: list[str] | None = None) -> int:
    """Fetch timm's test file for the installed version and run it on our models.

    Args:
        argv: command-line arguments (``--workdir DIR`` then, after ``--``, extra pytest arguments).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None, help="where to unpack timm's sdist (default: a temporary folder)")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    import timm

    work = Path(args.workdir or tempfile.mkdtemp(prefix="timm_tests_"))
    work.mkdir(parents=True, exist_ok=True)
    sdist = work / f"timm-{timm.__version__}.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"timm=={timm.__version__}", "-d", str(work)], check=True)
    run_dir = work / "run"
    run_dir.mkdir(exist_ok=True)
    with tarfile.open(sdist) as tar:
        member = tar.getmember(f"timm-{timm.__version__}/tests/test_models.py")
        (run_dir / "test_models.py").write_bytes(tar.extractfile(member).read())
    (run_dir / "conftest.py").write_text(CONFTEST)
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfs", "-W", "ignore", "test_models.py", *extra]
    return subprocess.run(cmd, cwd=run_dir).returncode


if __name__ == "__main__":
    sys.exit(main())
