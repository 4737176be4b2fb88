"""Decoder attention: GPT-2 small (12 layers, random weights), batch 1, CPU fp32, causal LM forward.

Variants, timed in one process with interleaved rounds (medians); memory: the peak resident memory a
forward adds above the loaded model, each variant in a fresh process:
- eager: transformers' eager attention (the model fxbt starts from);
- hf_sdpa: transformers' own SDPA attention (is_causal when there is no padding);
- fxbt: fxbt.optimize on the eager model.

    python bench/decoder.py [--seq 1024] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402

import fxbt  # noqa: E402

VARIANTS = ("eager", "hf_sdpa", "fxbt")


def build(variant: str):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)
    model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa" if variant == "hf_sdpa" else "eager")
    model.eval()
    if variant == "fxbt":
        example = {"input_ids": torch.randint(0, 50257, (1, 16))}
        return fxbt.optimize(model, example), model
    return model, model


def inputs(seq: int) -> dict:
    return {"input_ids": torch.randint(0, 50257, (1, seq), generator=torch.Generator().manual_seed(1))}


def one_variant(variant: str, seq: int) -> dict:
    """Run in a fresh process: one forward, report peak memory."""
    fn, _ = build(variant)
    x = inputs(seq)
    with torch.inference_mode():
        fn(**x)  # warm up: one-off allocations are not the forward's
        added = harness.forward_peak_gb(lambda: fn(**x))
    return {"variant": variant, "forward_peak_gb": added, "process_peak_gb": harness.peak_rss_gb()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.memory_of:
        print(json.dumps(one_variant(args.memory_of, args.seq)))
        return 0
    x = inputs(args.seq)
    models = {v: build(v)[0] for v in VARIANTS}
    with torch.inference_mode():
        ref = models["eager"](**x).logits
        err = {v: (models[v](**x).logits - ref).abs().max().item() for v in VARIANTS}
    report = fxbt.report(models["fxbt"])
    times = harness.interleaved_medians({v: (lambda m=models[v]: m(**x)) for v in VARIANTS}, args.repeats)
    memory = {v: harness.in_fresh_process(__file__, "--memory-of", v, "--seq", str(args.seq))["forward_peak_gb"]
              for v in VARIANTS}
    rows = [{"variant": v, "ms": 1000 * times[v], "speedup": times["eager"] / times[v], "forward_peak_gb": memory[v],
             "max_err": err[v]} for v in VARIANTS]
    print(f"GPT-2 small, batch 1, sequence {args.seq}, CPU fp32; {harness.machine()}")
    print(f"fxbt: {len(report.rewritten('sdpa'))} attentions rewritten "
          f"({sum(r.reason == 'is_causal' for r in report.rewritten())} is_causal)")
    print(f"{'variant':>8} {'median ms':>10} {'speedup':>8} {'forward peak GB':>16} {'max err':>9}")
    for r in rows:
        print(f"{r['variant']:>8} {r['ms']:>10.0f} {r['speedup']:>7.2f}x {r['forward_peak_gb']:>16.3f} {r['max_err']:>9.1e}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"seq": args.seq, "machine": harness.machine(), "rows": rows}, indent=1))
    fx, hf = times["fxbt"], times["hf_sdpa"]
    print(f"fxbt vs transformers' sdpa: {hf / fx:.2f}x time, forward peak {memory['fxbt'] - memory['hf_sdpa']:+.3f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
