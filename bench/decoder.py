"""Decoder attention: GPT-2 small (12 layers, random weights), batch 1, CPU fp32, causal LM forward.

Peers, timed in one process with interleaved rounds (medians); memory: the peak resident memory a forward
adds above the loaded (and, for compiled peers, compiled) model, each peer in a fresh process:
- eager: transformers' eager attention (the model fxbt starts from);
- hf_sdpa: transformers' own SDPA attention (is_causal when there is no padding);
- compile: torch.compile (inductor) of eager;
- fxbt: fxbt.optimize on the eager model;
- fxbt_inductor: torch.compile with backend="fxbt_inductor" (fxbt's attention rewrite, then inductor);
- bettertransformer: Optimum 1.23.3 + transformers 4.48.3 in bench/.venv-bettertransformer, against its own
  eager in its own process; skipped when that venv is missing.

    python bench/decoder.py [--seq 1024] [--repeats 9] [--no-compile]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402
from workloads import gpt2, gpt2_inputs  # noqa: E402

import fxbt  # noqa: E402

VARIANTS = ("eager", "hf_sdpa", "fxbt", "compile", "fxbt_inductor")


def build(variant: str):
    if variant == "hf_sdpa":
        return gpt2("sdpa")
    model = gpt2("eager")
    if variant == "fxbt":
        return fxbt.optimize(model, {"input_ids": torch.randint(0, 50257, (1, 16))})
    if variant in harness.COMPILE_BACKENDS:
        return torch.compile(model, backend=harness.COMPILE_BACKENDS[variant])
    return model


def one_variant(variant: str, seq: int) -> dict:
    """Run in a fresh process: one forward, report peak memory."""
    fn, x = build(variant), gpt2_inputs(seq)
    with torch.inference_mode():
        fn(**x)  # warm up (and compile): one-off allocations are not the forward's
        added = harness.forward_peak_gb(lambda: fn(**x))
    return {"variant": variant, "forward_peak_gb": added, "process_peak_gb": harness.peak_rss_gb()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=9)
    harness.add_peer_flags(parser)
    parser.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.memory_of:
        print(json.dumps(one_variant(args.memory_of, args.seq)))
        return 0
    names = [v for v in VARIANTS if not (args.no_compile and v in harness.COMPILE_BACKENDS)]
    x = gpt2_inputs(args.seq)
    models = {v: build(v) for v in names}
    with torch.inference_mode():
        ref = models["eager"](**x).logits
        err = {v: (models[v](**x).logits - ref).abs().max().item() for v in names}
    report = fxbt.report(models["fxbt"])
    times = harness.interleaved_medians({v: (lambda m=models[v]: m(**x)) for v in names}, args.repeats)
    memory = {v: harness.memory_in_fresh_process(__file__, "--memory-of", v, "--seq", str(args.seq))["forward_peak_gb"]
              for v in names}
    rows = [{"variant": v, "ms": 1000 * times[v], "speedup": times["eager"] / times[v], "forward_peak_gb": memory[v],
             "max_err": err[v]} for v in names]
    bt = None if args.no_bettertransformer else harness.bettertransformer("gpt2", [x], args.repeats)
    if bt:
        theirs = bt["rows"][0]
        peak = harness.bettertransformer("gpt2", [x], memory=True)["forward_peak_gb"]
        rows.append({"variant": "bettertransformer", "ms": theirs["ms"]["bettertransformer"],
                     "own_eager_ms": theirs["ms"]["eager"],
                     "speedup": theirs["ms"]["eager"] / theirs["ms"]["bettertransformer"],
                     "forward_peak_gb": peak, "max_err": theirs["max_err"]})
    print(f"GPT-2 small, batch 1, sequence {args.seq}, CPU fp32; {harness.machine()}")
    print(f"fxbt: {len(report.rewritten('sdpa'))} attentions rewritten "
          f"({sum(r.reason == 'is_causal' for r in report.rewritten())} is_causal); BetterTransformer: "
          f"{'transformers ' + bt['transformers'] + ', against its own eager' if bt else 'not measured'}")
    print(f"{'variant':>17} {'median ms':>10} {'speedup':>8} {'forward peak GB':>16} {'max err':>9}")
    for r in rows:
        print(f"{r['variant']:>17} {r['ms']:>10.0f} {r['speedup']:>7.2f}x {r['forward_peak_gb']:>16.3f} "
              f"{r['max_err']:>9.1e}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"seq": args.seq, "machine": harness.machine(), "bettertransformer":
                                        bt and bt["transformers"], "rows": rows}, indent=1))
    fx, hf = times["fxbt"], times["hf_sdpa"]
    print(f"fxbt vs transformers' sdpa: {hf / fx:.2f}x time, forward peak {memory['fxbt'] - memory['hf_sdpa']:+.3f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
