"""Packed tokens: the real tokens of a padded batch, one row each, and what a padding-free graph calls.

`Tokens` is one call's packing: which positions of the [batch, sequence] grid hold a real token, their flat
indices in row-major order, and where each sequence's tokens start among them. A tensor carries the token
axes somewhere in its shape ([b, s, e] for hidden states, [b, h, s, d] between the head split and attention):
its packed form is always [T] followed by its other axes in order, T the number of real tokens. `pack`
gathers the real tokens of a tensor (a size-1 token axis broadcasts), `unpack` scatters them back with zeros
at padded positions, `logical_size` answers size queries for the padded tensor a packed one stands for. Token
axes given as one axis twice (b_axis == s_axis) are merged: one axis of batch·sequence, batch outer. Between
the head split and attention a value may hold batch·heads in one axis ([b·h, s, d], batch outer): its packed
form is that of [b, h, s, d], [T, h, d].
All of it is made of differentiable ops.
"""
from __future__ import annotations

import torch


class Tokens:
    """Which positions of a [batch, sequence] grid are real tokens, for one call."""

    def __init__(self, keep: torch.Tensor):
        self.keep = keep
        self.batch, self.seq = keep.shape
        self.index = keep.reshape(-1).nonzero().squeeze(1)  # [T] flat positions of the real tokens
        self.count = int(self.index.numel())
        self._lengths: list[int] | None = None
        self._positions: list[torch.Tensor] | None = None
        self.cache: dict = {}  # per-call facts shared by the graph's attentions (masks restricted to real tokens)

    def lengths(self) -> list[int]:
        if self._lengths is None:
            self._lengths = self.keep.sum(1).tolist()
        return self._lengths

    def offsets(self) -> list[int]:
        out, start = [], 0
        for n in self.lengths():
            out.append(start)
            start += n
        return out

    def positions(self) -> list[torch.Tensor]:
        """Per sequence, the positions of its real tokens (to take a mask's rows and columns)."""
        if self._positions is None:
            self._positions = [row.nonzero().squeeze(1) for row in self.keep]
        return self._positions


def pack(x: torch.Tensor, tokens: Tokens, b_axis: int, s_axis: int) -> torch.Tensor:
    """[..b..s..] (a token axis of size 1 broadcasts) -> [T, the other axes in order]."""
    if b_axis == s_axis:
        sizes = list(x.shape)
        sizes[b_axis] = tokens.batch * tokens.seq
        return x.expand(sizes).movedim(b_axis, 0).index_select(0, tokens.index)
    sizes = list(x.shape)
    sizes[b_axis], sizes[s_axis] = tokens.batch, tokens.seq
    x = x.expand(sizes)
    others = [d for d in range(x.dim()) if d not in (b_axis, s_axis)]
    flat = x.permute(b_axis, s_axis, *others).reshape(tokens.batch * tokens.seq, *(sizes[d] for d in others))
    return flat.index_select(0, tokens.index)


def unpack(packed: torch.Tensor, tokens: Tokens, b_axis: int, s_axis: int, heads: int = 1) -> torch.Tensor:
    """[T, others] -> the padded tensor, zeros at padded positions, token axes where they belong (``heads`` > 1:
    [T, heads, others] -> batch·heads, batch outer, on ``b_axis``)."""
    if heads > 1:
        others = tuple(packed.shape[2:])
        full = packed.new_zeros((tokens.batch * tokens.seq, heads) + others).index_copy(0, tokens.index, packed)
        full = full.view((tokens.batch, tokens.seq, heads) + others).transpose(1, 2)
        return _placed(full.reshape((tokens.batch * heads, tokens.seq) + others), b_axis, s_axis)
    others = tuple(packed.shape[1:])
    full = packed.new_zeros((tokens.batch * tokens.seq,) + others).index_copy(0, tokens.index, packed)
    if b_axis == s_axis:
        return full.movedim(0, b_axis)
    return _placed(full.view((tokens.batch, tokens.seq) + others), b_axis, s_axis)


def _placed(full: torch.Tensor, b_axis: int, s_axis: int) -> torch.Tensor:
    """[batch, seq, others] with the two token axes moved to ``b_axis`` and ``s_axis``."""
    rank = full.dim()
    order = [0] * rank  # the padded tensor's axis i comes from the unpacked view's axis order[i]
    rest = iter(range(2, rank))
    for i in range(rank):
        order[i] = 0 if i == b_axis else 1 if i == s_axis else next(rest)
    return full.permute(order)


def logical_size(packed: torch.Tensor, tokens: Tokens, b_axis: int, s_axis: int, dim=None, heads: int = 1):
    """``size()`` / ``size(dim)`` of the padded tensor that ``packed`` stands for (``heads`` > 1: its batch axis
    holds batch·heads, the packed one an axis of the heads in its place)."""
    sizes = list(packed.shape[1:])
    if b_axis == s_axis:
        sizes.insert(b_axis, tokens.batch * tokens.seq)
    elif heads > 1:
        sizes.insert(s_axis, tokens.seq)
        sizes[b_axis] = tokens.batch * heads
    else:
        for axis, size in sorted(((b_axis, tokens.batch), (s_axis, tokens.seq))):
            sizes.insert(axis, size)
    if dim is None:
        return torch.Size(sizes)
    return sizes[dim]


def token_count(packed: torch.Tensor) -> int:
    return packed.shape[0]
