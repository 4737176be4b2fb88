"""Workloads shared by the benchmarks and the BetterTransformer worker (which must not import fxbt)."""
from __future__ import annotations

import torch


def padded_lengths(batch: int, seq: int, padding: float) -> list[int]:
    """Lengths spread evenly around the mean that makes ``padding`` of the batch padding, within [1, seq]."""
    mean = (1 - padding) * seq
    half = min(mean - 1, seq - mean)
    if batch == 1:
        return [round(mean)]
    return [max(1, min(seq, round(mean + half * (2 * b / (batch - 1) - 1)))) for b in range(batch)]


def bert_inputs(batch: int, seq: int, padding: float, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 20000, (batch, seq), generator=g)
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for row, length in enumerate(padded_lengths(batch, seq, padding)):
        mask[row, :length] = 1
    return {"input_ids": ids * mask, "attention_mask": mask}


def bert_base(attn: str | None):
    """BERT-base (12 layers, 768 hidden), random weights, eval mode."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig()
    if attn is None:
        return BertModel(config).eval()
    return BertModel._from_config(config, attn_implementation=attn).eval()
