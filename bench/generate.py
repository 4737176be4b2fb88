"""``generate()`` ms per token: GPT-2- and Llama-shaped causal LMs (random weights), greedy, CPU fp32.

One model and one batch per process, so every first call (torch.compile's, fxbt's) is a first call in that
process, with an empty inductor cache. Models (6 layers, hidden 768, built from configs, same weights for
every peer): ``gpt2`` (12 heads, vocab 50257) and ``llama`` (12 query heads, 4 KV heads, SwiGLU 2048, vocab
32000). Prompts of 32 tokens; batch 8 is left-padded to real lengths spread from 8 to 32.
Peers, each a fresh model:
- eager: ``attn_implementation="eager"``;  sdpa: ``attn_implementation="sdpa"`` (transformers' default);
- compile: the sdpa model with ``model.forward = torch.compile(model.forward)`` (inductor, default mode);
- fxbt: ``fxbt.optimize`` of the eager model (decoding steps, which pass a KV cache, run through
  torch.compile with the fxbt backend); fxbt_sdpa: the same on the sdpa model.
First call: the time of the first ``generate()`` (compilation included); fxbt's ``optimize()`` is timed
apart. Then rounds, in rotated order, of ``generate(max_new_tokens=N)`` and ``generate(max_new_tokens=1)``
per peer; medians. Decode ms/token = (T(N) - T(1)) / (N - 1); prefill = T(1). Every peer's tokens are
compared with eager's. dynamo's recompile limit is raised to 64 for all peers: the peers compile the same
``forward`` code, and dynamo counts recompilations per code object.

    python bench/generate.py --model gpt2|llama --batch 1|8 [--new-tokens 32] [--repeats 5]
"""
from __future__ import annotations

import os
import tempfile

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))  # an empty cache

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402
from workloads import padded_lengths  # noqa: E402

import fxbt  # noqa: E402

PEERS = ("eager", "sdpa", "compile", "fxbt", "fxbt_sdpa")
PROMPT = 32


def config(name: str):
    import transformers

    if name == "gpt2":
        return transformers.GPT2Config(n_layer=6, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)
    return transformers.LlamaConfig(num_hidden_layers=6, hidden_size=768, intermediate_size=2048,
                                    num_attention_heads=12, num_key_value_heads=4, vocab_size=32000,
                                    max_position_embeddings=1024)


def build(name: str, peer: str):
    """(model, seconds fxbt.optimize took or None)."""
    import transformers

    torch.manual_seed(0)
    attn = "eager" if peer in ("eager", "fxbt") else "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(config(name), attn_implementation=attn).eval()
    if peer == "compile":
        model.forward = torch.compile(model.forward)
    if peer.startswith("fxbt"):
        start = time.perf_counter()
        fxbt.optimize(model)
        return model, time.perf_counter() - start
    return model, None


def prompts(batch: int, vocab: int) -> dict:
    ids = torch.randint(3, vocab, (batch, PROMPT), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if batch > 1:  # left padding: real lengths spread evenly from 8 to 32
        for row, length in enumerate(padded_lengths(batch, PROMPT, 0.375)):
            mask[row, : PROMPT - length] = 0
    return {"input_ids": ids * mask, "attention_mask": mask}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("gpt2", "llama"), default="gpt2")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    harness.run_options(parser)
    args = parser.parse_args(argv)
    load_before = harness.start(args)
    torch._dynamo.config.recompile_limit = 64
    torch.compile(lambda x: x + 1, backend="eager")(torch.ones(1))  # dynamo's one-off start-up, charged to none
    models, optimize_s, first_s, tokens = {}, {}, {}, {}
    x = prompts(args.batch, config(args.model).vocab_size)

    def generate(peer, n):
        return models[peer].generate(**x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    for peer in args.peers:
        models[peer], optimize_s[peer] = build(args.model, peer)
        start = time.perf_counter()
        tokens[peer] = generate(peer, args.new_tokens)
        first_s[peer] = time.perf_counter() - start
        generate(peer, 1)  # the prefill-only call's shapes, compiled before timing
    same = {p: bool(torch.equal(t, tokens["eager"])) for p, t in tokens.items()} if "eager" in tokens else {}
    recompiled = dict.fromkeys(models, 0)  # graphs dynamo compiled during the timed calls: 0 when all were warm

    def timed(p, n):
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        generate(p, n)
        recompiled[p] += torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs

    variants = {f"{p} {n}": (lambda p=p, n=n: timed(p, n)) for p in models for n in (args.new_tokens, 1)}
    times = harness.interleaved_medians(variants, args.repeats, warmup=0, mode=contextlib.nullcontext)
    rows = {}
    for p in models:
        full, one = times[f"{p} {args.new_tokens}"], times[f"{p} 1"]
        rows[p] = {"decode_ms_per_token": 1000 * (full - one) / (args.new_tokens - 1), "prefill_ms": 1000 * one,
                   "generate_ms": 1000 * full, "first_generate_s": first_s[p], "optimize_s": optimize_s[p],
                   "tokens_equal_eager": same.get(p)}
    report = {p: len(fxbt.report(models[p]).compiled) for p in models if p.startswith("fxbt")}
    print(f"{args.model}-shaped, batch {args.batch}, prompt {PROMPT}, {args.new_tokens} new tokens; {harness.machine()}")
    print(f"{'peer':>10} {'decode ms/tok':>13} {'prefill ms':>10} {'first generate s':>16} {'optimize s':>10} same")
    for p, r in rows.items():
        print(f"{p:>10} {r['decode_ms_per_token']:13.2f} {r['prefill_ms']:10.1f} {r['first_generate_s']:16.2f} "
              f"{r['optimize_s'] or 0:10.2f} {r['tokens_equal_eager']}")
    print(f"graphs fxbt compiled for decoding: {report}; graphs dynamo compiled while timing: {recompiled}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": harness.machine(), "load": [load_before, harness.load_average()], "model": args.model, "batch": args.batch,
                                        "prompt": PROMPT, "new_tokens": args.new_tokens, "repeats": args.repeats,
                                        "mask": x["attention_mask"].sum(1).tolist(), "rows": rows,
                                        "fxbt_compiled_graphs": report,
                                        "compiled_while_timing": recompiled}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
