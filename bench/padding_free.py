"""Padding-free stacks on CPU fp32: fxbt's default (the whole stack on real tokens) against transformers' eager
and sdpa, by padding fraction, each workload in one process with the peers' repeats interleaved.

Workloads (random weights from configs, no hub):
- bert: BERT-base, batch 8, sequence 128, right padding (ratios over eager, and over sdpa);
- llama: a Llama-shaped decoder used as an embedder (hidden 1024, 8 layers, 16 heads, 4 KV heads), batch 8,
  sequence 256, left padding (ratios over sdpa);
- albert (gelu_new), clip (CLIP text), t5 (T5 encoder), roformer: BERT-base-like sizes, batch 8, sequence 128;
- gpt2: GPT-2 small (its linears run on [batch·sequence, features]) used as an embedder, batch 8, sequence 128,
  left padding;
- bloom: BLOOM (ALiBi; attention on [batch·heads, sequence, head dim]) of BERT-base sizes as an embedder, batch 8,
  sequence 128, left padding;
- deberta: DeBERTa-v3-base's architecture (disentangled relative attention: score terms from Q and K), batch 8,
  sequence 128, right padding;
- bart: BART-base's shape (6 encoder and 6 decoder layers), batch 8, source 128 and target 96 tokens, right
  padding of the same fraction on both sides: the decoder's stack, cross-attentions included, runs on its real
  tokens too;
- bert-train: one BERT-base training step (forward + backward, dropout on), batch 8, sequence 128.

    python bench/padding_free.py --workload bert --padding 0 0.25 0.5 0.75 [--repeats 5] [--threads N] [--out F.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import harness  # noqa: E402
from workloads import padded_lengths  # noqa: E402

import fxbt  # noqa: E402

BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
MODELS = {  # name -> (model class, config class, config, batch, seq, padding side)
    "bert": ("BertModel", "BertConfig", BASE, 8, 128, "right"),
    "llama": ("LlamaModel", "LlamaConfig", dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                                                  num_key_value_heads=4, intermediate_size=2816), 8, 256, "left"),
    "albert": ("AlbertModel", "AlbertConfig", dict(BASE, embedding_size=128, hidden_act="gelu_new"), 8, 128, "right"),
    "clip": ("CLIPTextModel", "CLIPTextConfig", dict(BASE, max_position_embeddings=128), 8, 128, "right"),
    "t5": ("T5EncoderModel", "T5Config", dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12), 8, 128,
           "right"),
    "roformer": ("RoFormerModel", "RoFormerConfig", BASE, 8, 128, "right"),
    "gpt2": ("GPT2Model", "GPT2Config", dict(n_embd=768, n_layer=12, n_head=12, n_positions=256), 8, 128, "left"),
    "bloom": ("BloomModel", "BloomConfig", dict(hidden_size=768, n_layer=12, n_head=12), 8, 128, "left"),
    "deberta": ("DebertaV2Model", "DebertaV2Config", dict(BASE, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                                          position_buckets=256, max_relative_positions=-1,
                                                          norm_rel_ebd="layer_norm", share_att_key=True,
                                                          position_biased_input=False), 8, 128, "right"),
    "bart": ("BartModel", "BartConfig", dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                                             decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072),
             8, 128, "right"),
}
SEQ2SEQ = {"bart": 96}  # the decoder's length; its real lengths take the same padding fraction


def build(name: str, attn: str, train=False):
    model_cls, config_cls, config, *_ = MODELS[name]
    torch.manual_seed(0)
    # as embedders, their KV caches off: a decoder returning its cache is served by torch.compile
    config = getattr(transformers, config_cls)(**config, use_cache=False)
    model = getattr(transformers, model_cls)._from_config(config, attn_implementation=attn)
    return model.train() if train else model.eval()


def inputs(name: str, padding: float, seed=0) -> dict:
    *_, batch, seq, side = MODELS[name]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (batch, seq), generator=g)
    mask = _mask(batch, seq, padding, side)
    if name in SEQ2SEQ:
        steps = SEQ2SEQ[name]
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids[:, :steps],
                "decoder_attention_mask": _mask(batch, steps, padding, side)}
    return {"input_ids": ids, "attention_mask": mask}


def _mask(batch: int, seq: int, padding: float, side: str) -> torch.Tensor:
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for row, n in enumerate(padded_lengths(batch, seq, padding)):
        if side == "left":
            mask[row, seq - n:] = 1
        else:
            mask[row, :n] = 1
    return mask


def real_error(want, got, mask) -> float:
    return ((want.last_hidden_state - got.last_hidden_state).abs() * mask[..., None]).max().item()


def inference(name: str, paddings, repeats: int) -> list[dict]:
    peers = {"eager": build(name, "eager")}
    try:
        peers["sdpa"] = build(name, "sdpa")
    except ValueError:  # transformers has no sdpa attention for it (RoFormer): its default is eager
        pass
    default = "sdpa" if "sdpa" in peers else "eager"
    rows = []
    for padding in paddings:
        batch = inputs(name, padding)
        start = time.perf_counter()
        fast = fxbt.optimize(build(name, default), batch)
        optimize_s = time.perf_counter() - start
        rows_ = fxbt.report(fast).rewritten("padding_free")
        variants = {k: (lambda m=m: m(**batch)) for k, m in peers.items()}
        variants["fxbt"] = lambda: fast(**batch)
        times = harness.interleaved_medians(variants, repeats)
        with torch.inference_mode():
            err = real_error(peers[default](**batch), fast(**batch),  # the decoder's output, where there is one
                             batch.get("decoder_attention_mask", batch["attention_mask"]))
        # over sdpa: over transformers' default attention for the model (eager where it has no sdpa)
        rows.append({"padding": padding, "ms": {k: 1000 * v for k, v in times.items()}, "default": default,
                     "over_eager": times["eager"] / times["fxbt"], "over_sdpa": times[default] / times["fxbt"],
                     "max_err": err, "optimize_s": optimize_s, "padding_free_regions": len(rows_),
                     "note": rows_[0].reason if rows_ else "not rewritten"})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def training(name: str, paddings, repeats: int) -> list[dict]:
    rows = []
    for padding in paddings:
        batch = inputs(name, padding)
        eager = build(name, "eager", train=True)
        fast = fxbt.optimize(build(name, "eager", train=True), batch)

        def step(model):
            model.zero_grad(set_to_none=True)
            model(**batch).last_hidden_state.float().pow(2).mean().backward()

        times = {"eager": [], "fxbt": []}
        for model in (eager, fast):
            step(model)  # warm up
        for i in range(repeats):
            for key, model in (("eager", eager), ("fxbt", fast))[::1 if i % 2 else -1]:
                start = time.perf_counter()
                step(model)
                times[key].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"padding": padding, "ms": {k: 1000 * v for k, v in med.items()},
                     "over_eager": med["eager"] / med["fxbt"],
                     "padding_free_regions": len(fxbt.report(fast).rewritten("padding_free"))})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=[*MODELS, "bert-train"], default="bert")
    parser.add_argument("--padding", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75])
    parser.add_argument("--repeats", type=int, default=5)
    harness.run_options(parser)
    args = parser.parse_args()
    load_before = harness.start(args)
    if args.workload == "bert-train":
        rows = training("bert", args.padding, args.repeats)
    else:
        rows = inference(args.workload, args.padding, args.repeats)
    result = {"workload": args.workload, "machine": harness.machine(), "load": [load_before, harness.load_average()],
              "repeats": args.repeats, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
