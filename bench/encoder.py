"""Encoder padding sweep: BERT-base (12 layers), batch 8, sequence 128, CPU fp32, inference.

Every peer in one run, speedups as ratios against eager measured alongside:
- eager: transformers' eager attention;       - hf_sdpa: transformers' own SDPA attention;
- compile: torch.compile (inductor) of eager;   - fxbt: fxbt.optimize (default implementation);
- fxbt_fused: fxbt with encoder blocks on PyTorch's fused encoder kernel (``encoder_impl="fused"``);
- fxbt_inductor: torch.compile with backend="fxbt_inductor" (fxbt's attention rewrite, then inductor);
- bettertransformer: Optimum 1.23.3 + transformers 4.48.3 in bench/.venv-bettertransformer (its own
  process, against its own eager baseline); skipped with a note when that venv is missing.

    bash bench/setup_venv.sh bettertransformer    # once
    python bench/encoder.py [--padding 0 0.25 0.5] [--repeats 7]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import harness  # noqa: E402
from workloads import bert_base, bert_inputs  # noqa: E402

import fxbt  # noqa: E402


def real_token_error(want, got, mask) -> float:
    return ((want.last_hidden_state - got.last_hidden_state).abs() * mask[..., None]).max().item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--padding", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    parser.add_argument("--repeats", type=int, default=7)
    harness.add_peer_flags(parser)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    eager = bert_base("eager")
    example = bert_inputs(2, 16, 0.25)
    variants = {"eager": eager, "hf_sdpa": bert_base("sdpa"),
                "fxbt": fxbt.optimize(eager, example, inplace=False),
                "fxbt_fused": fxbt.optimize(eager, example, encoder_impl="fused", inplace=False)}
    if not args.no_compile:
        variants.update(harness.compiled_peers(lambda: bert_base("eager")))
    default = fxbt.report(variants["fxbt"])
    impl = "the padding-free stack (the model's own ops on real tokens)" if default.rewritten("padding_free") \
        else ", ".join(sorted({r.impl for r in default.rewritten("fused_encoder")})) or "attention only"
    rows = []
    for padding in args.padding:
        x = bert_inputs(args.batch, args.seq, padding)
        with torch.inference_mode():
            want = eager(**x)
            errors = {name: real_token_error(want, fn(**x), x["attention_mask"]) for name, fn in variants.items()}
        times = harness.interleaved_medians({n: (lambda f=f: f(**x)) for n, f in variants.items()}, args.repeats)
        rows.append({"padding": padding, "real_fraction": x["attention_mask"].float().mean().item(),
                     "ms": {n: 1000 * t for n, t in times.items()},
                     "speedup": {n: times["eager"] / t for n, t in times.items()}, "max_err": errors})
    bt = None if args.no_bettertransformer else harness.bettertransformer(
        "bert_base", [bert_inputs(args.batch, args.seq, p) for p in args.padding], args.repeats)
    for row, theirs in zip(rows, bt["rows"] if bt else []):
        row["speedup"]["bettertransformer"] = theirs["ms"]["eager"] / theirs["ms"]["bettertransformer"]
        row["ms"]["bettertransformer (own eager)"] = theirs["ms"]["eager"]
        row["ms"]["bettertransformer"] = theirs["ms"]["bettertransformer"]
        row["max_err"]["bettertransformer"] = theirs["max_err"]
    print(f"BERT-base, batch {args.batch}, sequence {args.seq}, CPU fp32; {harness.machine()}")
    print(f"fxbt default implementation: {impl}; BetterTransformer: " +
          (f"transformers {bt['transformers']}" if bt else "not measured (bash bench/setup_venv.sh bettertransformer)"))
    names = list(rows[0]["speedup"])
    print(f"{'padding':>8} " + " ".join(f"{n:>17}" for n in names))
    for row in rows:
        print(f"{row['padding']:>8.2f} " + " ".join(f"{row['speedup'][n]:>16.2f}x" for n in names))
    print("max abs error on real tokens vs eager: " + ", ".join(
        f"{n} {max(r['max_err'][n] for r in rows):.1e}" for n in rows[0]["max_err"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": harness.machine(), "impl": impl, "bettertransformer":
                                        bt and bt["transformers"], "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
