"""Runs inside bench/.venv-bettertransformer (optimum 1.23.3, transformers 4.48.3): eager and
BetterTransformer on one model and the same inputs, in one process. Prints one JSON line; never imports fxbt.

    python bettertransformer_worker.py MODEL INPUTS.pt --repeats 7        # medians and errors per input
    python bettertransformer_worker.py MODEL INPUTS.pt --memory-of NAME   # forward peak GB on the first input
    python bettertransformer_worker.py MODEL INPUTS.pt --device cuda --dtype float16   # on a GPU, in fp16

MODEL is a workload of workloads.py (bert_base, gpt2) or a pretrained model's folder; INPUTS.pt a list of
keyword-input dicts saved with torch.save.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402
import workloads  # noqa: E402


def real_token_error(want, got, mask) -> float:
    """Max abs difference of the first outputs on real tokens. BetterTransformer's encoder output can come
    back padded only to the longest real sequence, so compare the common length."""
    want, got = want[0], got[0]
    n = min(want.shape[1], got.shape[1])
    diff = (want[:, :n] - got[:, :n]).abs()
    if mask is not None:
        diff = diff * mask[:, :n].reshape(*mask.shape[:1], n, *[1] * (diff.dim() - 2)).to(diff.dtype)
    return diff.max().item()


def build(model: str, name: str, device="cpu", dtype=torch.float32):
    from optimum.bettertransformer import BetterTransformer

    eager = workloads.model(model, "eager").to(device, dtype)
    return eager if name == "eager" else BetterTransformer.transform(eager, keep_original_model=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("inputs", type=Path)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--memory-of", choices=["eager", "bettertransformer"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    args = parser.parse_args()
    inputs = [{k: v.to(args.device) for k, v in x.items()} for x in torch.load(args.inputs)]
    dtype = getattr(torch, args.dtype)
    import optimum.version
    import transformers
    out = {"transformers": transformers.__version__, "optimum": optimum.version.__version__, "torch": torch.__version__}
    if args.memory_of:
        fn, x = build(args.model, args.memory_of), inputs[0]
        with torch.inference_mode():
            fn(**x)  # warm up: one-off allocations are not the forward's
            out["forward_peak_gb"] = harness.forward_peak_gb(lambda: fn(**x))
        print(json.dumps(out))
        return
    variants = {name: build(args.model, name, args.device, dtype) for name in ("eager", "bettertransformer")}
    out["rows"] = []
    for x in inputs:
        with torch.inference_mode():
            want = variants["eager"](**x)
            err = real_token_error(want, variants["bettertransformer"](**x), x.get("attention_mask"))
        times = harness.interleaved_medians({n: (lambda f=f: f(**x)) for n, f in variants.items()}, args.repeats)
        out["rows"].append({"ms": {n: 1000 * t for n, t in times.items()}, "max_err": err})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
