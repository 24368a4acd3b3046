"""How far each AgentSD setting moves the output of a pipeline, on the tiny local pipelines.

    python benchmarks/agentsd_quality.py

Tiny random-weight SD- and SDXL-shaped pipelines (``agentlit.diffusion.build_tiny_pipeline``), two
prompts with guidance 7.5, 10 steps, 32x32 px images in [0, 1], ``ratio`` 0.5. For every setting
(the default patch, ``share_matching``, ``merge_mlp``, one level deeper) it prints the mean and max
absolute pixel difference against the unpatched pipeline and against the default patch, and writes
them to ``benchmarks/results/agentsd_quality.json``. Random weights: this compares settings with
each other, it says nothing of image quality in absolute terms.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from agentlit.diffusion import apply_patch, build_tiny_pipeline, remove_patch

RESULTS = Path(__file__).resolve().parent / "results"


def generate(pipe, steps: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return pipe(["a cat", "a dog"], num_inference_steps=steps, height=32, width=32, guidance_scale=7.5,
                generator=g, output_type="pt").images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--output", type=Path, default=RESULTS / "agentsd_quality.json")
    args = p.parse_args()
    rows = []
    for kind, level in (("sd", 1), ("sdxl", 2)):
        pipe = build_tiny_pipeline(seed=0, kind=kind)
        unpatched = generate(pipe, args.steps)
        settings = {"default": {}, "shared": {"share_matching": True}, "mlp": {"merge_mlp": True},
                    "deeper": {"max_downsample": 2 * level}}
        outs = {}
        for name, kwargs in settings.items():
            apply_patch(pipe, args.ratio, **kwargs)
            torch.manual_seed(0)
            outs[name] = generate(pipe, args.steps)
            remove_patch(pipe)
        for name, out in outs.items():
            d, e = (out - unpatched).abs(), (out - outs["default"]).abs()
            row = {"pipeline": kind, "setting": name, "vs_unpatched_mean": d.mean().item(),
                   "vs_unpatched_max": d.max().item(), "vs_default_mean": e.mean().item(), "vs_default_max": e.max().item()}
            rows.append(row)
            print(f"{kind:5s} {name:8s} vs unpatched: mean {row['vs_unpatched_mean']:.4f} max {row['vs_unpatched_max']:.4f}; "
                  f"vs default: mean {row['vs_default_mean']:.4f} max {row['vs_default_max']:.4f}", flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"benchmark": "agentsd_quality", "ratio": args.ratio, "steps": args.steps,
                                       "rows": rows}, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
