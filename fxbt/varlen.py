"""Attention over packed sequences in one kernel call, where each sequence needs no mask among its real tokens.

A padding-free graph holds q, k and v as [T, heads, head dim], every sequence's real tokens one after the
other. Where each sequence's attention needs no mask among its real tokens (key padding only, or causal with
the real tokens first), one call computes all of them instead of one SDPA call per sequence:

- `attention`: `torch.nn.attention.varlen.varlen_attn`, from the sequences' offsets. It is flash attention:
  CUDA, fp16 or bf16, no dropout, a head dim of at most 256 and a multiple of 8, the same for q, k and v
  (`fits` says which).
- `padded_attention`: the sequences padded again, to the longest real one only, and one SDPA call with their
  key-padding mask: any dtype, dropout, autograd. On CUDA, where launches cost more than the padded work.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

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


def padded_attention(tokens, q, k, v, causal: bool, scale, dropout_p: float, gqa: bool) -> torch.Tensor:
    """[T, heads, head dim] from one SDPA call over the sequences padded to the longest real one."""
    rows, longest, mask = _padding_plan(tokens, q.device, causal)

    def padded(x):  # [T, h, d] -> [batch, h, longest, d], zeros after each sequence's real tokens
        flat = x.new_zeros((tokens.batch * longest,) + tuple(x.shape[1:])).index_copy(0, rows, x)
        return flat.view((tokens.batch, longest) + tuple(x.shape[1:])).transpose(1, 2)

    out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=mask, dropout_p=dropout_p,
                                         scale=scale, enable_gqa=gqa and k.shape[1] != q.shape[1])
    return out.transpose(1, 2).flatten(0, 1).index_select(0, rows)


def _padding_plan(tokens, device, causal: bool):
    """Where each packed token goes in [batch·longest] (its sequence, then its rank among that sequence's real
    tokens), the longest sequence, and the mask [batch, 1, 1 or longest, longest] of each sequence's real keys
    (causal: and of the keys up to the query). Shared by the call's attentions."""
    key = ("padded", device, causal)
    if key not in tokens.cache:
        lengths = torch.tensor(tokens.lengths(), device=device)
        longest = max(tokens.lengths())
        sequence = torch.repeat_interleave(torch.arange(tokens.batch, device=device), lengths)
        rank = torch.arange(tokens.count, device=device) - (torch.cumsum(lengths, 0) - lengths)[sequence]
        mask = (torch.arange(longest, device=device)[None, :] < lengths[:, None])[:, None, None, :]
        if causal:
            mask = mask & torch.ones(longest, longest, dtype=torch.bool, device=device).tril()
        tokens.cache[key] = (sequence * longest + rank, longest, mask)
    return tokens.cache[key]
