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


def gpt2(attn: str):
    """GPT-2 small (12 layers, 768 hidden, 1024 positions), random weights, eval mode, LM head."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    # its KV cache off: a decoder returning its cache is served by torch.compile, and a prefill needs none
    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257, use_cache=False)
    return GPT2LMHeadModel._from_config(config, attn_implementation=attn).eval()


def gpt2_inputs(seq: int) -> dict:
    return {"input_ids": torch.randint(0, 50257, (1, seq), generator=torch.Generator().manual_seed(1))}


def pretrained(path: str, attn: str):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, attn_implementation=attn).eval()


def model(name: str, attn: str):
    """A workload's model by name (``bert_base``, ``gpt2``) or a pretrained model's folder."""
    builders = {"bert_base": bert_base, "gpt2": gpt2}
    return builders[name](attn) if name in builders else pretrained(name, attn)


class PlainEncoderLayer(torch.nn.Module):
    """A post-norm encoder block written in plain PyTorch, the way a user would: no transformers inside."""

    def __init__(self, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.q, self.k, self.v, self.out = (torch.nn.Linear(hidden, hidden) for _ in range(4))
        self.norm1, self.norm2 = torch.nn.LayerNorm(hidden), torch.nn.LayerNorm(hidden)
        self.up, self.down = torch.nn.Linear(hidden, ffn), torch.nn.Linear(ffn, hidden)

    def forward(self, x, bias):
        b, s, hidden = x.shape
        q, k, v = (p(x).view(b, s, self.heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        probs = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim ** 0.5 + bias, dim=-1)
        x = self.norm1(x + self.out((probs @ v).transpose(1, 2).reshape(b, s, hidden)))
        return self.norm2(x + self.down(torch.nn.functional.gelu(self.up(x))))


class PlainEncoder(torch.nn.Module):
    """A stack of :class:`PlainEncoderLayer` over hidden states, with a [batch, seq] mask (1 = real token)."""

    def __init__(self, layers: int, hidden: int = 256, heads: int = 4, ffn: int = 1024):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(PlainEncoderLayer(hidden, heads, ffn) for _ in range(layers))

    def forward(self, x, mask):
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, bias)
        return x
