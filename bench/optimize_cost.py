"""The cost of optimize() against depth, per capture frontend, beside torch.compile's (inductor) first call
(in a fresh process with an empty inductor cache: what a user's first run pays).

Two models with 2 to 48 layers (hidden 256, 4 heads, feed-forward 1024, batch 2, sequence 32):
- bert: transformers' BertModel. Frontends hf_fx (transformers 4.x only: run this script in
  bench/.venv-transformers4 for it) and dynamo; plain torch.fx cannot trace it (the reason is recorded).
- plain: workloads.PlainEncoder, an encoder written in plain PyTorch. Frontends fx and dynamo.

    python bench/optimize_cost.py [--layers 2 8 24 48] [--models bert plain] [--no-compile]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import BertConfig, BertModel

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402
from workloads import PlainEncoder  # noqa: E402

import fxbt  # noqa: E402


def bert(layers: int):
    torch.manual_seed(0)
    config = BertConfig(hidden_size=256, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=1024)
    model = BertModel._from_config(config, attn_implementation="eager").eval()
    ids = torch.randint(1000, 2000, (2, 32), generator=torch.Generator().manual_seed(0))
    return model, ((), {"input_ids": ids, "attention_mask": torch.ones(2, 32, dtype=torch.long)})


def plain(layers: int):
    mask = torch.ones(2, 32, dtype=torch.long)
    mask[1, 20:] = 0
    return PlainEncoder(layers).eval(), ((torch.randn(2, 32, 256, generator=torch.Generator().manual_seed(0)), mask),
                                         {})


MODELS = {"bert": bert, "plain": plain}


def frontends(model: str) -> list[str]:
    if model == "plain":
        return ["fx", "dynamo"]
    return ["hf_fx", "dynamo"] if transformers.__version__.startswith("4.") else ["dynamo"]


def measure(name: str, layers: int, compile_too: bool) -> dict:
    row = {}
    for frontend in frontends(name):
        # a fresh model per frontend: each frontend's cost on a model no earlier optimize() has touched
        model, (args, kwargs) = MODELS[name](layers)
        example = kwargs or args
        torch._dynamo.reset()
        start = time.perf_counter()
        gm = fxbt.optimize(model, example, frontend=frontend)
        row[f"{name} {frontend}"] = time.perf_counter() - start
        if not fxbt.report(gm).rewritten():  # the cost of rewriting nothing is not the cost of optimize()
            raise SystemExit(f"{name} via {frontend}: nothing rewritten")
    if compile_too:
        with tempfile.TemporaryDirectory() as cache:
            row[f"{name} torch.compile first call"] = harness.in_fresh_process(
                __file__, "--compile-first-call", name, str(layers), env={"TORCHINDUCTOR_CACHE_DIR": cache})["s"]
    return row


def compile_first_call(name: str, layers: int) -> float:
    """Run in a fresh process with an empty inductor cache: the first call of torch.compile(model), after a
    warm-up compile of something else has loaded inductor and its compiler toolchain."""
    torch.compile(lambda t: torch.relu(t) + 1)(torch.ones(3))
    model, (args, kwargs) = MODELS[name](layers)
    compiled = torch.compile(model)
    start = time.perf_counter()
    with torch.inference_mode():
        compiled(*args, **kwargs)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 24, 48])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--compile-first-call", nargs=2, metavar=("MODEL", "LAYERS"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.compile_first_call:
        name, layers = args.compile_first_call
        print(json.dumps({"s": compile_first_call(name, int(layers))}))
        return 0
    rows = []
    for layers in args.layers:
        row = {"layers": layers}
        for name in args.models:
            row.update(measure(name, layers, not args.no_compile))
        rows.append(row)
        print(json.dumps(row), flush=True)
    failed = {}
    if "bert" in args.models:  # why plain fx is not a frontend for it
        model, (_, kwargs) = bert(2)
        try:
            fxbt.optimize(model, kwargs, frontend="fx")
        except fxbt.CaptureError as e:
            failed["bert fx"] = str(e).splitlines()[1].strip(" -")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": harness.machine(), "transformers": transformers.__version__,
                                        "failed": failed, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
