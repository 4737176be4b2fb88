"""Attention over packed sequences in one kernel call: PyTorch's variable-length flash attention.

A padding-free graph holds q, k and v as [T, heads, head dim], every sequence's real tokens one after the
other. Where each sequence's attention needs no mask among its real tokens (key padding only, or causal with
the real tokens first), `torch.nn.attention.varlen.varlen_attn` computes all of them from the sequences'
offsets in one launch, instead of one SDPA call per sequence. It is flash attention: CUDA, fp16 or bf16,
a head dim of at most 256 and a multiple of 8, the same for q, k and v; anything else keeps the per-sequence
calls (`fits` says which).
"""
from __future__ import annotations

import inspect

import torch

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch before 2.10
    varlen_attn = None

# its keywords changed between releases: causal is `is_causal` in 2.10, a window (-1, 0) after
_KEYWORDS = set(inspect.signature(varlen_attn).parameters) if varlen_attn is not None else set()
_DTYPES = (torch.float16, torch.bfloat16)


def uniform_causality(masks, lengths) -> bool | None:
    """Per-sequence (mask, is_causal) pairs as one flag for every sequence: None where a sequence still needs a
    mask among its real tokens, or where some are causal and others not (a sequence of one token is both)."""
    flags = set()
    for (mask, causal), n in zip(masks, lengths):
        if mask is not None:
            return None
        if n > 1:
            flags.add(causal)
    return None if len(flags) > 1 else flags.pop() if flags else False


def fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, gqa: bool) -> bool:
    """The kernel computes this call: see the module's docstring."""
    head_dim = q.shape[-1]
    return (varlen_attn is not None and q.is_cuda and q.dtype in _DTYPES and dropout_p == 0.0
            and k.shape[-1] == v.shape[-1] == head_dim and head_dim % 8 == 0 and head_dim <= 256
            and "scale" in _KEYWORDS and (not gqa or "enable_gqa" in _KEYWORDS or k.shape[1] == q.shape[1]))


def attention(tokens, q, k, v, causal: bool, scale, gqa: bool) -> torch.Tensor:
    """[T, heads, head dim] for packed q, k, v ([T, heads or kv heads, head dim])."""
    key = ("varlen", q.device)
    if key not in tokens.cache:  # the offsets, shared by the call's attentions
        ends = [*tokens.offsets(), tokens.count]
        tokens.cache[key] = (torch.tensor(ends, dtype=torch.int32, device=q.device), max(tokens.lengths()))
    offsets, longest = tokens.cache[key]
    options = {"scale": scale}
    if causal:
        options.update({"window_size": (-1, 0)} if "window_size" in _KEYWORDS else {"is_causal": True})
    if gqa and k.shape[1] != q.shape[1]:
        options["enable_gqa"] = True
    return varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), offsets, offsets, longest, longest,
                       **options)
