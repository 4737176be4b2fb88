"""The cost of fxbt's own work: matching plus rewriting (capture excluded), against model depth.

BERT built from a config with 2 to 48 layers is captured once per depth; the rewrite pass (canonical
view, matching, checks, region installation) is then timed on fresh copies of that graph. The claim
to hold: under 0.2 s per 1,000 graph nodes, with time per node flat as depth grows (linear cost).

    python bench/rewrite_cost.py [--layers 2 4 8 16 32 48] [--repeats 5]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import BertConfig, BertModel

import fxbt
from fxbt import registry
from fxbt.report import Report
from fxbt.rewrite import apply_rules

BUDGET_PER_1000_NODES = 0.2


def measure(layers: int, repeats: int) -> dict:
    config = BertConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=128,
                        vocab_size=100, max_position_embeddings=64)
    model = BertModel(config, attn_implementation="eager") if _takes_attn() else BertModel(config)
    model.eval()
    example = {"input_ids": torch.randint(0, 100, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    start = time.perf_counter()
    captured = fxbt.capture(model, example)
    capture_s = time.perf_counter() - start
    nodes = len(captured.gm.graph.nodes)
    rules = registry.select(None)
    times = []
    for _ in range(repeats):
        gm = copy.deepcopy(captured.gm)
        report = Report(captured.frontend)
        start = time.perf_counter()
        apply_rules(gm, rules, report)
        times.append(time.perf_counter() - start)
    rewrite_s = statistics.median(times)
    return {"layers": layers, "nodes": nodes, "frontend": captured.frontend, "capture_s": capture_s,
            "rewrite_s": rewrite_s, "s_per_1000_nodes": 1000 * rewrite_s / nodes,
            "regions": len(report.rewritten())}


def _takes_attn() -> bool:
    import inspect
    return "attn_implementation" in inspect.signature(BertModel.__init__).parameters


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 16, 32, 48])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = [measure(n, args.repeats) for n in args.layers]
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'layers':>6} {'nodes':>6} {'frontend':>8} {'capture s':>10} {'rewrite s':>10} {'s/1000 nodes':>13}")
    for r in rows:
        print(f"{r['layers']:>6} {r['nodes']:>6} {r['frontend']:>8} {r['capture_s']:>10.2f} {r['rewrite_s']:>10.3f} "
              f"{r['s_per_1000_nodes']:>13.3f}")
    per_node = [r["s_per_1000_nodes"] for r in rows]
    ok = max(per_node) < BUDGET_PER_1000_NODES
    print(f"worst {max(per_node):.3f} s per 1000 nodes (budget {BUDGET_PER_1000_NODES}); "
          f"per-node cost ratio deepest/shallowest {per_node[-1] / per_node[0]:.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
