"""What the guards cost per call: BERT-base, batch 8, sequence 128, fp32, 25% padding.

Every call of an optimized model binds its inputs, works out the call's kind (inputs given, dtypes, ranks,
devices, every module's training flag), evaluates the capture's shape guard and checks that the model still
holds the parameters and buffers its graph reads. This times that dispatch alone (binding up to finding the
specialization, 1,000 times), and the whole call and the graph alone, interleaved; the dispatch share is
dispatch / whole call.

    python bench/guard_cost.py [--repeats 15] [--out results/guard-cost.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch.utils._pytree as pytree

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402
from workloads import bert_base, bert_inputs  # noqa: E402

import fxbt  # noqa: E402
from fxbt.guards import call_key  # noqa: E402
from fxbt.optimized import installed  # noqa: E402


def dispatch_seconds(dispatcher, inputs: dict, calls: int) -> float:
    """Median seconds of the per-call dispatch: bind, call kind, shape guard, state guard."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        bound = dispatcher.signature.bind((), inputs)
        key = call_key(bound, dispatcher.modules)
        spec = dispatcher._find(key, pytree.tree_leaves(bound))
        times.append(time.perf_counter() - start)
    assert spec is not None
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    harness.run_options(parser)
    args = parser.parse_args(argv)
    load_before = harness.start(args)
    model = bert_base("eager")
    inputs = bert_inputs(8, 128, 0.25)
    fxbt.optimize(model, inputs)
    dispatcher = installed(model)
    spec = dispatcher.specializations[0]
    leaves = pytree.tree_leaves(dispatcher.signature.bind((), inputs))
    times = harness.interleaved_medians({"call": lambda: model(**inputs), "graph": lambda: spec.run(leaves)},
                                        args.repeats)
    dispatch = dispatch_seconds(dispatcher, inputs, 1000)
    share = dispatch / times["call"]
    print(f"BERT-base b8 s128, 25% padding; {harness.machine()}")
    print(f"whole call {1000 * times['call']:.1f} ms, graph alone {1000 * times['graph']:.1f} ms, "
          f"dispatch {1e6 * dispatch:.0f} us = {100 * share:.3f}% of the call")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": harness.machine(), "load": [load_before, harness.load_average()], "call_ms": 1000 * times["call"],
                                        "graph_ms": 1000 * times["graph"], "dispatch_us": 1e6 * dispatch,
                                        "share": share, "parameters": len(spec.state.tensors),
                                        "modules": len(dispatcher.modules),
                                        "shape_conditions": len(spec.shapes.conditions)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
