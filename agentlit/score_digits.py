"""Score a digits ``generation.json`` with the digits SVM (not trained by the generation module).

    python -m agentlit.score_digits runs/digits_diffusion/version_0/predict/predictions/generation.json

Prints the conditional accuracy overall and per class as JSON.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    """Print :func:`agentlit.tasks.metrics.score_generation` of the file named in ``argv``.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``): one path to a ``generation.json``.
    """
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        sys.exit("usage: python -m agentlit.score_digits <generation.json written by agentlit predict>")
    if not Path(argv[0]).is_file():
        sys.exit(f"agentlit.score_digits: {argv[0]} does not exist; give the generation.json that "
                 "`agentlit predict --config configs/generation/digits.yaml` wrote")
    from .tasks.metrics import score_generation

    print(json.dumps(score_generation(argv[0]), indent=2))


if __name__ == "__main__":
    main()
