"""Runs inside bench/.venv-bettertransformer (optimum 1.23.3, transformers 4.48.3): times eager and
BetterTransformer BERT-base in one process, interleaved. Prints one JSON line. Never imports fxbt."""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from workloads import bert_base, bert_inputs  # noqa: E402


def main() -> None:
    batch, seq, repeats = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    paddings = [float(p) for p in sys.argv[4].split(",")]
    from optimum.bettertransformer import BetterTransformer

    eager = bert_base("eager")
    bt = BetterTransformer.transform(bert_base("eager"), keep_original_model=False)
    out = {}
    with torch.inference_mode():
        for padding in paddings:
            x = bert_inputs(batch, seq, padding)
            times = {"eager": [], "bettertransformer": []}
            for fn in (eager, bt):
                fn(**x)
            for r in range(repeats):
                order = [("eager", eager), ("bettertransformer", bt)][:: 1 if r % 2 == 0 else -1]
                for name, fn in order:
                    start = time.perf_counter()
                    fn(**x)
                    times[name].append(time.perf_counter() - start)
            out[str(padding)] = {k: statistics.median(v) for k, v in times.items()}
    import transformers
    print(json.dumps({"transformers": transformers.__version__, "times": out}))


if __name__ == "__main__":
    main()
