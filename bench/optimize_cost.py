"""The cost of optimize() against depth: BERT with 2 to 48 layers, per capture frontend available in this
environment, beside torch.compile's (inductor) first call on the same model.

    python bench/optimize_cost.py [--layers 2 8 24 48] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import BertConfig, BertModel

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402

import fxbt  # noqa: E402


def bert(layers: int):
    torch.manual_seed(0)
    config = BertConfig(hidden_size=256, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=1024)
    return BertModel._from_config(config, attn_implementation="eager").eval()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 24, 48])
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    frontends = ["hf_fx", "dynamo"] if transformers.__version__.startswith("4.") else ["dynamo"]
    example = {"input_ids": torch.randint(1000, 2000, (2, 32)), "attention_mask": torch.ones(2, 32, dtype=torch.long)}
    rows = []
    for layers in args.layers:
        model = bert(layers)
        row = {"layers": layers}
        for frontend in frontends:
            torch._dynamo.reset()
            row[f"optimize_{frontend}_s"] = timed(lambda: fxbt.optimize(model, example, frontend=frontend))
        if not args.no_compile:
            torch._dynamo.reset()
            compiled = torch.compile(model)
            with torch.inference_mode():
                row["compile_first_call_s"] = timed(lambda: compiled(**example))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": harness.machine(), "frontends": frontends, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
