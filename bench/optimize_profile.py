"""Where optimize() spends its time, stage by stage (fxbt/stages.py), against depth, on transformers 5
(dynamo capture), each configuration in a fresh process; beside BERT-base's torch.compile first call (cold
inductor cache) and one eager forward, measured in the same run.

Workloads (random weights, eval mode, fp32, one thread per process unless --threads):
- bert-256-L{2,24}: BertModel, hidden 256, 4 heads, feed-forward 1024; example batch 2, sequence 32.
- bert-base: BertModel (12 layers, hidden 768); example batch 8, sequence 128, a quarter padding.
- bert-base-built: the same model optimized without an example (fxbt builds batch 2, sequence 16).
- swin-L{2,8}: SwinModel, 2 stages (depths 1+1 and 2+6), embed 32, window 4, image 32, patch 2; batch 2.

    python bench/optimize_profile.py [--repeats 2] [--out bench/results/optimize-profile.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # this checkout's fxbt, then the bench helpers

import torch  # noqa: E402

WORKLOADS = ["bert-256-L2", "bert-256-L24", "bert-base", "bert-base-built", "swin-L2", "swin-L8"]


def build(name: str):
    """The model and the example optimize() captures."""
    from workloads import bert_base, bert_inputs

    torch.manual_seed(0)
    if name.startswith("bert-256"):
        from transformers import BertConfig, BertModel

        layers = int(name.rsplit("L", 1)[1])
        config = BertConfig(hidden_size=256, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=1024)
        model = BertModel._from_config(config, attn_implementation="eager").eval()
        ids = torch.randint(1000, 2000, (2, 32), generator=torch.Generator().manual_seed(0))
        return model, {"input_ids": ids, "attention_mask": torch.ones(2, 32, dtype=torch.long)}
    if name == "bert-base":
        return bert_base("eager"), bert_inputs(8, 128, 0.25)
    if name == "bert-base-built":
        return bert_base("eager"), None
    if name.startswith("swin"):
        from transformers import SwinConfig, SwinModel

        depths = {"swin-L2": [1, 1], "swin-L8": [2, 6]}[name]
        config = SwinConfig(image_size=32, patch_size=2, embed_dim=32, depths=depths, num_heads=[2, 4],
                            window_size=4)
        model = SwinModel._from_config(config, attn_implementation="eager").eval()
        return model, {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
    raise ValueError(name)


def profile_one(name: str) -> dict:
    """In a fresh process: optimize() once, its wall time and its stages."""
    import fxbt
    from fxbt.stages import timed

    model, example = build(name)
    with timed() as stages:
        start = time.perf_counter()
        fxbt.optimize(model, example, frontend="dynamo")
        total = time.perf_counter() - start
    report = fxbt.report(model)
    stages["other"] = max(0.0, total - sum(stages.values()))
    return {"total": total, "stages": stages, "rows": len(report.rows), "rewritten": len(report.rewritten())}


def compile_first_call() -> dict:
    """In a fresh process with an empty inductor cache: BERT-base's first torch.compile call, after a warm-up
    compile of something else has loaded inductor and its toolchain (as in bench/optimize_cost.py)."""
    torch.compile(lambda t: torch.relu(t) + 1)(torch.ones(3))
    model, example = build("bert-base")
    compiled = torch.compile(model)
    start = time.perf_counter()
    with torch.inference_mode():
        compiled(**example)
    return {"total": time.perf_counter() - start}


def eager_forward(repeats: int = 5) -> dict:
    """BERT-base, batch 8, sequence 128: the median of a few eager forwards after one warm-up."""
    model, example = build("bert-base")
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            start = time.perf_counter()
            model(**example)
            times.append(time.perf_counter() - start)
    return {"total": statistics.median(times[1:])}


def child(kind: str) -> dict:
    if kind == "compile":
        return compile_first_call()
    if kind == "eager":
        return eager_forward()
    return profile_one(kind)


def fresh(kind: str, threads: int) -> dict:
    import harness

    env = {"OMP_NUM_THREADS": str(threads), "FXBT_PROFILE_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache
        return harness.in_fresh_process(__file__, "--child", kind, env=env)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=WORKLOADS, choices=WORKLOADS)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each configuration, interleaved")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-peers", action="store_true", help="skip torch.compile's first call and eager")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.child:
        torch.set_num_threads(int(os.environ.get("FXBT_PROFILE_THREADS", "1")))
        print(json.dumps(child(args.child)))
        return 0
    import harness
    import transformers

    kinds = list(args.workloads) + ([] if args.no_peers else ["compile", "eager"])
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for _ in range(args.repeats):  # interleaved: each round runs every configuration once
        for kind in kinds:
            runs[kind].append(fresh(kind, args.threads))
            print(kind, json.dumps(runs[kind][-1]), flush=True)
    result = {"machine": harness.machine(), "transformers": transformers.__version__, "threads": args.threads,
              "repeats": args.repeats, "commit": _commit(), "results": {k: _median(v) for k, v in runs.items()}}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


def _median(runs: list[dict]) -> dict:
    """The run of median total time (its stages with it, so that they still sum to its total)."""
    ordered = sorted(runs, key=lambda r: r["total"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["all_totals"] = [r["total"] for r in runs]
    return chosen


def _commit() -> str | None:
    import subprocess

    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
    return done.stdout.strip() or None


if __name__ == "__main__":
    sys.exit(main())
