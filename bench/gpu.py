"""fxbt on a CUDA device: padding removal in fp16 against transformers and BetterTransformer, same run.

- bert: BERT-base fp16, batch 64, sequence 256, right padding (the setting of BetterTransformer's published T4
  figures: 2.14x and 4.37x over fp16 eager at 50% and 75% padding). Peers: transformers' eager and sdpa, and
  BetterTransformer over its own eager in its own process (optimum 1.23.3 on transformers 4.48.3, from
  ``--bettertransformer-site``, a folder of those packages). fxbt two ways: its default (the whole
  stack padding-free: the model's own ops on packed tokens, attention by variable-length flash attention), and
  its encoder-block template with the fused kernel (``encoder_impl="fused"``).
- llama: the Llama-shaped embedder of bench/padding_free.py in fp16 (batch 8, sequence 256, left padding)
  against sdpa.
- bert-train: one BERT-base training step in fp32 (forward + backward, dropout on), batch 32, sequence 256.

Times are medians of interleaved repeats, each run synchronized; errors are max abs over real tokens against
the model's fp32 eager output on the same device (fp16 eager's own error beside them).

    python bench/gpu.py [--padding 0 0.25 0.5 0.75] [--repeats 20] [--bettertransformer-site DIR] [--out F.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import harness  # noqa: E402
import padding_free  # noqa: E402
import workloads  # noqa: E402

import fxbt  # noqa: E402

DEVICE = "cuda"
# fxbt's default (the whole stack padding-free), and its encoder-block template on the fused kernel
FXBT = {"fxbt": {}, "fxbt_fused": {"encoder_impl": "fused"}}


def on_device(batch: dict) -> dict:
    return {k: v.to(DEVICE) for k, v in batch.items()}


def real_error(want, got, mask) -> float:
    return ((want[0].float() - got[0].float()).abs() * mask[..., None]).max().item()


def bert(paddings, repeats: int, site: str | None) -> dict:
    batches = [workloads.bert_inputs(64, 256, p) for p in paddings]
    reference = workloads.bert_base("eager").to(DEVICE)
    peers = {attn: workloads.bert_base(attn).to(DEVICE, torch.float16) for attn in ("eager", "sdpa")}
    example = on_device(workloads.bert_inputs(64, 256, 0.5))
    optimize_s = {}
    for name, options in FXBT.items():
        start = time.perf_counter()
        peers[name] = fxbt.optimize(workloads.bert_base("sdpa").to(DEVICE, torch.float16), example, **options)
        torch.cuda.synchronize()
        optimize_s[name] = time.perf_counter() - start
    rows = []
    for padding, cpu_batch in zip(paddings, batches):
        times, errors = timed(peers, reference, on_device(cpu_batch), repeats)
        rows.append({"padding": padding, "ms": {k: 1000 * v for k, v in times.items()}, "max_err": errors,
                     "over_eager": {k: times["eager"] / v for k, v in times.items()}})
        print(json.dumps(rows[-1]), flush=True)
    result = {"rows": rows, "optimize_s": optimize_s, "calls": {k: calls(peers[k]) for k in FXBT}}
    if site:
        result["bettertransformer"] = bettertransformer(batches, repeats, site)
    return result


def timed(peers: dict, reference, batch: dict, repeats: int) -> tuple[dict, dict]:
    """Each peer's median seconds on ``batch`` (interleaved), and its max error on real tokens against
    ``reference`` (the fp32 model)."""
    times = harness.interleaved_medians({k: (lambda m=m: m(**batch)) for k, m in peers.items()}, repeats, warmup=2)
    with torch.inference_mode():
        want = reference(**batch)
        errors = {k: real_error(want, m(**batch), batch["attention_mask"]) for k, m in peers.items()}
    return times, errors


def calls(model) -> dict:
    """Per rewritten kernel (and implementation), the calls that took its fast path and those that fell back."""
    out: dict = {}
    for row in fxbt.report(model).rewritten():
        tally = out.setdefault(f"{row.kernel} {row.impl}".strip(), {})
        for why, n in row.calls.items():
            tally[why] = tally.get(why, 0) + n
    return out


def bettertransformer(batches, repeats: int, site: str) -> dict:
    """BetterTransformer over its own eager, fp16, in a process whose packages come from ``site`` first."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "inputs.pt"
        torch.save(batches, path)
        out = harness.in_fresh_process(str(HERE / "bettertransformer_worker.py"), "bert_base", str(path),
                                       "--repeats", str(repeats), "--device", DEVICE, "--dtype", "float16",
                                       env={"PYTHONPATH": os.pathsep.join([site, os.environ.get("PYTHONPATH", "")])})
    for row in out["rows"]:
        row["over_eager"] = row["ms"]["eager"] / row["ms"]["bettertransformer"]
    print(json.dumps(out), flush=True)
    return out


def llama(paddings, repeats: int) -> list[dict]:
    build = lambda attn: padding_free.build("llama", attn).to(DEVICE)  # noqa: E731
    reference = build("eager")
    peers = {attn: build(attn).half() for attn in ("eager", "sdpa")}
    start = time.perf_counter()
    peers["fxbt"] = fxbt.optimize(build("sdpa").half(), on_device(padding_free.inputs("llama", 0.5)))
    optimize_s = time.perf_counter() - start
    rows = []
    for padding in paddings:
        times, errors = timed(peers, reference, on_device(padding_free.inputs("llama", padding)), repeats)
        rows.append({"padding": padding, "ms": {k: 1000 * v for k, v in times.items()}, "max_err": errors,
                     "over_sdpa": times["sdpa"] / times["fxbt"], "optimize_s": optimize_s,
                     "calls": calls(peers["fxbt"])})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def training(repeats: int, padding: float = 0.5) -> dict:
    batch = on_device(workloads.bert_inputs(32, 256, padding))
    models = {"eager": workloads.bert_base("eager").to(DEVICE).train()}
    models["fxbt"] = fxbt.optimize(workloads.bert_base("eager").to(DEVICE).train(), batch)

    def step(model):
        model.zero_grad(set_to_none=True)
        model(**batch).last_hidden_state.pow(2).mean().backward()

    med = harness.interleaved_medians({k: (lambda m=m: step(m)) for k, m in models.items()}, repeats,
                                      mode=contextlib.nullcontext)  # gradients on
    row = {"padding": padding, "ms": {k: 1000 * v for k, v in med.items()}, "over_eager": med["eager"] / med["fxbt"],
           "calls": calls(models["fxbt"])}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", nargs="+", choices=["bert", "llama", "bert-train"],
                        default=["bert", "llama", "bert-train"])
    parser.add_argument("--padding", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--bettertransformer-site", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA device")
    result = {"device": torch.cuda.get_device_name(), "machine": harness.machine(), "repeats": args.repeats}
    if "bert" in args.workload:
        result["bert"] = bert(args.padding, args.repeats, args.bettertransformer_site)
    if "llama" in args.workload:
        result["llama"] = llama(args.padding, args.repeats)
    if "bert-train" in args.workload:
        result["bert_train"] = training(max(3, args.repeats // 2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
