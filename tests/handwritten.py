"""Hand-written attention in the styles people actually write, and near-miss twins that are not attention.

Every module takes ``x`` [batch, seq, dim] and an optional ``mask`` [batch, seq] (1 = real token).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

DIM, HEADS = 32, 4


class BmmMaskedFill(nn.Module):
    """Separate projections, (batch·heads) layout with bmm, division by sqrt(d), boolean masked_fill -inf."""

    def __init__(self, causal=False):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(DIM, DIM) for _ in range(3))
        self.o = nn.Linear(DIM, DIM)
        self.causal = causal

    def forward(self, x, mask):
        b, s, _ = x.shape
        h, d = HEADS, DIM // HEADS

        def split(t):
            return t.view(b, s, h, d).transpose(1, 2).reshape(b * h, s, d)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(d)
        keep = mask[:, None, :].expand(b, h, s).reshape(b * h, 1, s).bool()
        scores = scores.masked_fill(~keep, float("-inf"))
        out = torch.bmm(F.softmax(scores, dim=-1), v)
        return self.o(out.view(b, h, s, d).transpose(1, 2).reshape(b, s, DIM))


class EinsumFusedQKV(nn.Module):
    """One fused QKV projection split by chunk, einsum products, multiplication by the scale, additive mask."""

    fx_traceable = False  # unpacks a Proxy: plain fx cannot trace it, dynamo can

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM, bias=False)
        self.o = nn.Linear(DIM, DIM, bias=False)
        self.scale = (DIM // HEADS) ** -0.5

    def forward(self, x, mask):
        b, s, _ = x.shape
        q, k, v = (t.view(b, s, HEADS, -1).permute(0, 2, 1, 3) for t in self.qkv(x).chunk(3, dim=-1))
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * self.scale
        scores = scores + (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0
        probs = scores.softmax(dim=-1)
        out = torch.einsum("bhqk,bhkd->bhqd", probs, v)
        return self.o(out.permute(0, 2, 1, 3).reshape(b, s, DIM))


class NanoGPTCausal(nn.Module):
    """nanoGPT: fused qkv split by slicing, Q scaled before the product, causal ``tril`` buffer, upcast softmax."""

    fx_traceable = False  # slices a buffer with traced sizes

    def __init__(self, max_len=64):
        super().__init__()
        self.c_attn = nn.Linear(DIM, 3 * DIM)
        self.c_proj = nn.Linear(DIM, DIM)
        self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len)).view(1, 1, max_len, max_len))

    def forward(self, x, mask=None):
        b, t, c = x.shape
        qkv = self.c_attn(x)
        q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
        q = q.view(b, t, HEADS, c // HEADS).transpose(1, 2) * (1.0 / math.sqrt(c // HEADS))
        k = k.view(b, t, HEADS, c // HEADS).transpose(1, 2)
        v = v.view(b, t, HEADS, c // HEADS).transpose(1, 2)
        att = q @ k.transpose(-2, -1)
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        att = F.softmax(att.float(), dim=-1).type_as(q)
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
        return self.c_proj(y)


class SplitScaleWhere(nn.Module):
    """Scale split across Q and K (d**-0.25 each), ``where`` with the dtype minimum, arange causal + padding."""

    fx_traceable = False  # torch.finfo of a traced dtype

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(DIM, DIM, bias=False) for _ in range(3))

    def forward(self, x, mask):
        b, s, _ = x.shape
        d = DIM // HEADS
        q = self.q(x).view(b, s, HEADS, d).permute(0, 2, 1, 3) * d**-0.25
        k = self.k(x).view(b, s, HEADS, d).permute(0, 2, 3, 1) * d**-0.25  # K stored transposed
        v = self.v(x).view(b, s, HEADS, d).permute(0, 2, 1, 3)
        pos = torch.arange(s, device=x.device)
        keep = (pos[None, :] <= pos[:, None])[None, None] & mask[:, None, None, :].bool()
        scores = torch.where(keep, q @ k, torch.finfo(x.dtype).min)
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, DIM)


class GroupedQuery(nn.Module):
    """Grouped-query attention: 2 key/value heads repeated with repeat_interleave for 4 query heads."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(DIM, DIM, bias=False)
        self.kv = nn.Linear(DIM, DIM, bias=False)  # 2 heads of 8 for K and for V

    def forward(self, x, mask):
        b, s, _ = x.shape
        d = DIM // HEADS
        q = self.q(x).view(b, s, HEADS, d).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, 2, d).permute(2, 0, 3, 1, 4).unbind(0)
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(d)
        scores = scores + torch.zeros_like(mask, dtype=x.dtype).masked_fill(mask == 0, -1e9)[:, None, None, :]
        return torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(b, s, DIM)


class EinsumHeadsThird(nn.Module):
    """Heads kept as the third axis throughout: scores by ``bqhd,bkhd->bhqk``, the output by ``bhqk,bkhd->bqhd``
    (an einsum whose output is permuted), heads merged by reshape; masked scores filled with -1e9."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.o = nn.Linear(DIM, DIM)

    def forward(self, x, mask):
        b, s, _ = x.shape
        qkv = self.qkv(x).view(b, s, 3, HEADS, DIM // HEADS)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(DIM // HEADS)
        scores = scores.masked_fill(mask[:, None, None, :] == 0, -1e9)
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)
        return self.o(out.reshape(b, s, DIM))


class FairseqTimeFirst(nn.Module):
    """fairseq's layout: time first ([s, b, e]), heads merged into the batch by ``view(s, b·h, d).transpose(0, 1)``,
    Q scaled before the bmm, the key-padding mask applied on a [b, h, s, s] view of the scores."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))

    def forward(self, x, mask):
        x = x.transpose(0, 1)
        s, b, e = x.shape
        h, d = HEADS, DIM // HEADS
        q = (self.q(x) * d**-0.5).contiguous().view(s, b * h, d).transpose(0, 1)
        k = self.k(x).contiguous().view(-1, b * h, d).transpose(0, 1)
        v = self.v(x).contiguous().view(-1, b * h, d).transpose(0, 1)
        scores = torch.bmm(q, k.transpose(1, 2)).view(b, h, s, s)
        scores = scores.masked_fill((mask == 0)[:, None, None, :], float("-inf")).view(b * h, s, s)
        out = torch.bmm(F.softmax(scores, dim=-1), v).transpose(0, 1).contiguous().view(s, b, e)
        return self.o(out).transpose(0, 1)


class BlockedLocal(EinsumHeadsThird):
    """Blocked local attention (`EinsumHeadsThird`'s projections): the sequence cut into blocks of ``BLOCK``, each
    attending within itself, with 5-d einsums over [batch, heads, block, position, dim] and the key-padding mask
    cut the same way. The sequence length must be a multiple of ``BLOCK``."""

    BLOCK = 4

    def forward(self, x, mask):
        b, s, _ = x.shape
        n, w, d = s // self.BLOCK, self.BLOCK, DIM // HEADS
        qkv = self.qkv(x).view(b, n, w, 3, HEADS, d).permute(3, 0, 4, 1, 2, 5)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = torch.einsum("bhnqd,bhnkd->bhnqk", q, k) / math.sqrt(d)
        scores = scores + (1.0 - mask.view(b, 1, n, 1, w).to(x.dtype)) * -10000.0
        out = torch.einsum("bhnqk,bhnkd->bhnqd", scores.softmax(dim=-1), v)
        return self.o(out.permute(0, 2, 3, 1, 4).reshape(b, s, DIM))


class EllipsisEinsum(nn.Module):
    """x-transformers' style: scores by ``... i d, ... j d -> ... i j`` and the output by ``... i j, ... j d -> ... i d``
    (einsums with an ellipsis for the batch and head axes), masked scores filled with -finfo.max."""

    def __init__(self):
        super().__init__()
        self.to_qkv = nn.Linear(DIM, 3 * DIM, bias=False)
        self.to_out = nn.Linear(DIM, DIM)

    def forward(self, x, mask):
        b, s, _ = x.shape
        q, k, v = self.to_qkv(x).view(b, s, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        sim = torch.einsum("... i d, ... j d -> ... i j", q, k) * (DIM // HEADS) ** -0.5
        sim = sim.masked_fill(~mask[:, None, None, :].bool(), -torch.finfo(torch.float32).max)
        out = torch.einsum("... i j, ... j d -> ... i d", sim.softmax(dim=-1), v)
        return self.to_out(out.transpose(1, 2).reshape(b, s, DIM))


STYLES = [BmmMaskedFill, EinsumFusedQKV, NanoGPTCausal, SplitScaleWhere, GroupedQuery, EinsumHeadsThird,
          FairseqTimeFirst, EllipsisEinsum]
MASKED_STYLES = [s for s in STYLES if s is not NanoGPTCausal]  # nanoGPT's attention is causal only


class Residual(nn.Module):
    """Blocks of one style, each reading the [batch, seq] mask, with residuals and layer norms between them."""

    def __init__(self, style, layers=2):
        super().__init__()
        self.blocks = nn.ModuleList(style() for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(DIM) for _ in range(layers))

    def forward(self, x, mask):
        for block, norm in zip(self.blocks, self.norms):
            x = norm(x + block(x, mask))
        return x


# --- near misses: they look like attention, and are not (or not rewritable as SDPA) -----------------


class BmmHeadsOuter(BmmMaskedFill):
    """Near-miss twin of `BmmMaskedFill` for padding removal: the bmm layout merges heads·batch, heads outer. Still
    attention, but its batch axis is not batch-outer: packed tokens would mix sequences."""

    def forward(self, x, mask):
        b, s, _ = x.shape
        h, d = HEADS, DIM // HEADS

        def split(t):
            return t.view(b, s, h, d).permute(2, 0, 1, 3).reshape(h * b, s, d)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(d)
        keep = mask[None, :, None, :].expand(h, b, 1, s).reshape(h * b, 1, s).bool()
        out = torch.bmm(F.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1), v)
        return self.o(out.view(h, b, s, d).permute(1, 2, 0, 3).reshape(b, s, DIM))


class SoftmaxOverQueries(BmmMaskedFill):
    """Softmax over the wrong axis."""

    def forward(self, x, mask):
        q = k = v = self.q(x)
        return torch.matmul(torch.softmax(q @ k.transpose(-2, -1), dim=-2), v)


class ReturnsProbabilities(nn.Module):
    """The probabilities are an output too (SDPA never materialises them)."""

    def forward(self, x, mask):
        probs = torch.softmax(x @ x.transpose(-2, -1), dim=-1)
        return probs @ x, probs


class TensorScale(nn.Module):
    """A per-head learned temperature: the scale is a tensor, SDPA's is a number."""

    def __init__(self):
        super().__init__()
        self.temperature = nn.Parameter(torch.ones(HEADS, 1, 1))

    def forward(self, x, mask):
        b, s, _ = x.shape
        q = x.view(b, s, HEADS, -1).transpose(1, 2)
        return torch.softmax((q @ q.transpose(-2, -1)) * self.temperature, dim=-1) @ q


class MultiplicativeMask(nn.Module):
    """Scores multiplied by the mask: not an additive or boolean mask."""

    def forward(self, x, mask):
        scores = (x @ x.transpose(-2, -1)) * mask[:, None, :].to(x.dtype)
        return torch.softmax(scores, dim=-1) @ x


class FillWithZero(nn.Module):
    """Masked scores set to 0, which keeps them in the softmax."""

    def forward(self, x, mask):
        scores = (x @ x.transpose(-2, -1)).masked_fill(mask[:, None, :] == 0, 0.0)
        return torch.softmax(scores, dim=-1) @ x


class ReweightedProbabilities(nn.Module):
    """Probabilities changed after the softmax (talking-heads style): not SDPA."""

    def forward(self, x, mask):
        probs = torch.softmax(x @ x.transpose(-2, -1), dim=-1)
        return (probs * 2.0) @ x


class SoftCappedScores(nn.Module):
    """Scores soft-capped by tanh before the mask (Gemma 2 style): SDPA has no place for the cap."""

    def forward(self, x, mask):
        scores = torch.tanh((x @ x.transpose(-2, -1)) / 50.0) * 50.0
        scores = scores.masked_fill(mask[:, None, :] == 0, float("-inf"))
        return torch.softmax(scores, dim=-1) @ x


class ClampedScores(nn.Module):
    """Scores clamped from below by ``torch.max(scores, finfo.min)`` after an additive mask (T5 fp16 style)."""

    def forward(self, x, mask):
        scores = (x @ x.transpose(-2, -1)) + (1.0 - mask[:, None, :].to(x.dtype)) * -1e9
        scores = torch.max(scores, torch.tensor(torch.finfo(x.dtype).min))
        return torch.softmax(scores, dim=-1) @ x


NEAR_MISSES = {
    SoftmaxOverQueries: "not the last (keys) axis",
    ReturnsProbabilities: "attention probabilities are also returned",
    TensorScale: "scale is a",
    MultiplicativeMask: "scale is a tensor",
    FillWithZero: "not to a large negative constant",
    ReweightedProbabilities: "probabilities are changed by",
    SoftCappedScores: "scores pass through tanh",
    ClampedScores: "scores pass through",
}


class SizeScaledBlock(nn.Module):
    """A post-norm encoder block whose attention scale is computed from sizes at run time, four ways:
    from the hidden size read off ``x`` (``head_dim``), from ``q.size(-1)`` (``q_size``), passed to SDPA
    (``sdpa``) — all fixed by the weights — and from the sequence length (``seq_len``), which is not."""

    def __init__(self, scale_from):
        super().__init__()
        self.scale_from = scale_from
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.up, self.down = nn.Linear(DIM, 4 * DIM), nn.Linear(4 * DIM, DIM)

    def forward(self, x, bias, position=None):  # position: a bias of its own, added after the mask
        b, s, e = x.shape
        d = e // HEADS
        q, k, v = (p(x).view(b, s, HEADS, d).transpose(1, 2) for p in (self.q, self.k, self.v))
        if self.scale_from == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=q.size(-1) ** -0.5)
        else:
            scores = q @ k.transpose(-1, -2)
            if self.scale_from == "head_dim":
                scores = scores / d ** 0.5
            elif self.scale_from == "q_size":
                scores = scores * q.size(-1) ** -0.5
            else:
                scores = scores / s ** 0.5
            scores = scores + bias
            out = torch.softmax(scores if position is None else scores + position, dim=-1) @ v
        x = self.norm1(x + self.o(out.transpose(1, 2).reshape(b, s, e)))
        return self.norm2(x + self.down(F.gelu(self.up(x))))


class PackedQKVBlock(nn.Module):
    """A pre-norm encoder block (timm's ViT style) with Q, K and V from one projection, taken apart four
    ways: ``index`` (qkv[0]), ``unbind``, ``chunk`` (thirds of the features, then heads), and ``per_head``
    (each head's q, k, v side by side, GPT-NeoX's packing: another order than the fused kernel's)."""

    def __init__(self, split):
        super().__init__()
        self.split = split
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.fc1, self.fc2 = nn.Linear(DIM, 4 * DIM), nn.Linear(4 * DIM, DIM)

    def forward(self, x, bias):
        b, s, e = x.shape
        qkv = self.qkv(self.norm1(x))
        if self.split in ("index", "unbind"):
            qkv = qkv.reshape(b, s, 3, HEADS, e // HEADS).permute(2, 0, 3, 1, 4)
            q, k, v = (qkv[0], qkv[1], qkv[2]) if self.split == "index" else qkv.unbind(0)
        elif self.split == "chunk":
            q, k, v = (t.view(b, s, HEADS, -1).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        else:
            q, k, v = qkv.view(b, s, HEADS, 3 * (e // HEADS)).transpose(1, 2).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(-2, -1) * (e // HEADS) ** -0.5 + bias, dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, s, e))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Stack(nn.Module):
    """Blocks taking (x, additive key-padding bias), over hidden states and a [batch, seq] mask."""

    def __init__(self, block, layers=3):
        super().__init__()
        self.layers = nn.ModuleList(block() for _ in range(layers))

    def forward(self, x, mask):
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, bias)
        return x


def inputs(batch=2, seq=7, pad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, DIM, generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad and batch > 1:
        mask[1, seq // 2:] = 0
    return x, mask


# --- models for the soundness tests -------------------------------------------------------------------


class SlidingWindow(nn.Module):
    """Causal attention over the last ``window`` positions, its mask built from sizes alone (arange
    comparisons): purely causal whenever the sequence is no longer than the window, and not beyond."""

    def __init__(self, window=4):
        super().__init__()
        self.window = window
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))

    def forward(self, x, mask=None):
        b, s, _ = x.shape
        d = DIM // HEADS
        q, k, v = (p(x).view(b, s, HEADS, d).transpose(1, 2) for p in (self.q, self.k, self.v))
        pos = torch.arange(s, device=x.device)
        keep = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < self.window)
        scores = (q @ k.transpose(-2, -1) / math.sqrt(d)).masked_fill(~keep, float("-inf"))
        return self.o((torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, s, DIM))


class ConvPooledStack(nn.Module):
    """An encoder stack whose output a convolution then mixes over positions, mask or no mask (CANINE's
    downsampling, SEW's pooling): padded positions are read there, so they must hold the original's values."""

    def __init__(self):
        super().__init__()
        self.stack = Stack(lambda: SizeScaledBlock("head_dim"), layers=2)
        self.pool = nn.Conv1d(DIM, DIM, 3, padding=1)

    def forward(self, x, mask):
        return self.pool(self.stack(x, mask).transpose(1, 2)).transpose(1, 2)


class MaskPooledStack(nn.Module):
    """An encoder stack pooled over its real tokens as sentence-transformers pools: ``"mean"``, the states times the
    mask summed over positions (``"mean_expanded"``: the mask expanded as the states, then cast); ``"max"``, padded positions filled with -inf before the max; ``"unmasked"`` (the
    near-miss twin), a mean over every position. The pooling mask may be given apart from the attention's."""

    def __init__(self, mode="mean"):
        super().__init__()
        self.mode = mode
        self.stack = Stack(lambda: SizeScaledBlock("head_dim"), layers=2)

    def forward(self, x, mask, pool_mask):
        h = self.stack(x, mask)
        keep = pool_mask[..., None].to(h.dtype)
        if self.mode == "mean_expanded":
            keep = pool_mask.unsqueeze(-1).expand_as(h).float()
        if self.mode.startswith("mean"):
            return (h * keep).sum(1) / keep.sum(1).clamp(min=1e-9)
        if self.mode == "max":
            return h.masked_fill(keep == 0, float("-inf")).max(dim=1).values
        return h.mean(1)


class PoolerStack(nn.Module):
    """An encoder stack and a pooler reading position 0 (BERT's): padded only with left padding."""

    def __init__(self):
        super().__init__()
        self.stack = Stack(lambda: SizeScaledBlock("head_dim"), layers=2)
        self.dense = nn.Linear(DIM, DIM)

    def forward(self, x, mask):
        h = self.stack(x, mask)
        return h, torch.tanh(self.dense(h[:, 0]))


class BiasedStack(nn.Module):
    """Encoder blocks whose additive mask is not a key-padding mask: ``per_head`` adds an ALiBi-like bias per
    head, ``keys_alibi`` one over keys alone as a second [heads, 1, keys] term, ``local`` lets each token see
    only its neighbours (the mask differs per query)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.layers = nn.ModuleList(SizeScaledBlock("head_dim") for _ in range(2))

    def forward(self, x, mask):
        s = x.shape[1]
        pos = torch.arange(s, device=x.device)
        distance = (pos[None, :] - pos[:, None]).abs().to(x.dtype)
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0
        slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=x.dtype)
        if self.kind == "per_head":
            bias = bias - slopes[None, :, None, None] * distance
        elif self.kind == "keys_alibi":  # MPT's ALiBi: a bias over keys only, [heads, 1, keys], added on its own
            for layer in self.layers:
                x = layer(x, bias, -slopes[:, None, None] * pos.to(x.dtype))
            return x
        else:
            bias = bias + (distance > 2).to(x.dtype) * -10000.0
        for layer in self.layers:
            x = layer(x, bias)
        return x


class CrossAttending(nn.Module):
    """An encoder stack, and a decoder layer attending over its output with a mask of its own (``cross``, 1 =
    the key may be read): the encoder's padded positions are keys there, masked only where ``cross`` says so."""

    def __init__(self):
        super().__init__()
        self.encoder = Stack(lambda: SizeScaledBlock("head_dim"), layers=2)
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))

    def forward(self, x, mask, y, cross):
        memory = self.encoder(x, mask)
        (b, t, e), d = y.shape, DIM // HEADS
        q = self.q(y).view(b, t, HEADS, d).transpose(1, 2)
        k, v = (p(memory).view(*memory.shape[:2], HEADS, d).transpose(1, 2) for p in (self.k, self.v))
        scores = q @ k.transpose(-1, -2) / d ** 0.5 + (1.0 - cross[:, None, None, :].to(y.dtype)) * -10000.0
        return memory, self.o((torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, t, e))


class DecoderLayer(nn.Module):
    """Self-attention over the decoder's tokens, cross-attention over ``memory`` (keys from elsewhere), an MLP.
    ``keys``: "memory" (a cross-attention), or the near-miss "running_mean": keys and values from a running mean
    of the decoder's own states, which reads the positions before each token, padded ones too."""

    def __init__(self, keys="memory"):
        super().__init__()
        self.keys = keys
        self.self_attention = SizeScaledBlock("head_dim")
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))
        self.norm = nn.LayerNorm(DIM)

    def forward(self, y, bias, memory, cross_bias):
        y = self.self_attention(y, bias)
        (b, t, e), d = y.shape, DIM // HEADS
        if self.keys == "running_mean":
            steps = torch.arange(1, t + 1, device=y.device, dtype=y.dtype)[None, :, None]
            memory, cross_bias = y.cumsum(1) / steps, bias
        q = self.q(y).view(b, t, HEADS, d).transpose(1, 2)
        k, v = (p(memory).view(*memory.shape[:2], HEADS, d).transpose(1, 2) for p in (self.k, self.v))
        scores = q @ k.transpose(-1, -2) / d ** 0.5 + cross_bias
        return self.norm(y + self.o((torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, t, e)))


class EncoderDecoder(nn.Module):
    """An encoder stack over ``x`` and a decoder stack over ``y``, each with its own padding mask."""

    def __init__(self, keys="memory"):
        super().__init__()
        self.encoder = Stack(lambda: SizeScaledBlock("head_dim"), layers=2)
        self.decoder = nn.ModuleList(DecoderLayer(keys) for _ in range(2))

    def forward(self, x, mask, y, y_mask):
        memory = self.encoder(x, mask)
        cross_bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0
        bias = (1.0 - y_mask[:, None, None, :].to(y.dtype)) * -10000.0
        for layer in self.decoder:
            y = layer(y, bias, memory, cross_bias)
        return memory, y


class PickedPooler(nn.Module):
    """An encoder stack and a pooler picking one position per row by index tensors (CLIP's end-of-text token):
    ``given`` picks the positions passed in; ``argmax``, the near-miss, picks them from the stack's own output,
    which reads every position, padded ones too."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.stack = Stack(lambda: SizeScaledBlock("head_dim"), layers=2)
        self.score = nn.Linear(DIM, 1)

    def forward(self, x, mask, pick):
        h = self.stack(x, mask)
        rows = torch.arange(h.shape[0], device=h.device)
        return h, h[rows, pick if self.kind == "given" else self.score(h)[..., 0].argmax(-1)]


class MergedTokensBlock(nn.Module):
    """GPT-2's Conv1D and OPT's feed-forward: the projections run on [batch·sequence, features] (``view(-1, e)``,
    ``addmm``), Q, K and V taken apart with ``split``. Near-miss twin ``sequence_outer``: the tokens are merged
    sequence-major ([sequence·batch, features]); the feed-forward then runs on the same rows, but the
    merged axis is not batch-outer, so it stays out of a packed region (on packed tokens it would mean other rows)."""

    def __init__(self, order="batch_outer"):
        super().__init__()
        self.order = order
        self.qkv_w, self.qkv_b = nn.Parameter(torch.randn(DIM, 3 * DIM) * 0.1), nn.Parameter(torch.zeros(3 * DIM))
        self.o = nn.Linear(DIM, DIM)
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.up, self.down = nn.Linear(DIM, 4 * DIM), nn.Linear(4 * DIM, DIM)

    def forward(self, x, bias):
        b, s, e = x.shape
        qkv = torch.addmm(self.qkv_b, self.norm1(x).view(-1, e), self.qkv_w).view(b, s, 3 * e)
        q, k, v = (t.view(b, s, HEADS, -1).transpose(1, 2) for t in qkv.split(e, dim=2))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = x + self.o(out.transpose(1, 2).reshape(b, s, e))
        if self.order == "batch_outer":
            rows = self.norm2(x).reshape(-1, e)
            return x + self.down(F.gelu(self.up(rows))).view(b, s, e)
        rows = self.norm2(x).transpose(0, 1).reshape(-1, e)
        return x + self.down(F.gelu(self.up(rows))).view(s, b, e).transpose(0, 1)


class InPlaceMasked(nn.Module):
    """XLM's attention: the scores masked in place, the mask broadcast with ``expand_as(scores)``, softmax reading
    ``scores`` by its old name. Near-miss twin ``view_first``: a view of the scores taken before the write is what
    softmax reads (it sees the write through the shared memory), so the write must stay in place."""

    def __init__(self, kind="plain"):
        super().__init__()
        self.kind = kind
        self.q, self.k, self.v = (nn.Linear(DIM, DIM) for _ in range(3))

    def forward(self, x, mask):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, HEADS, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2) / (DIM // HEADS) ** 0.5
        seen = scores.view(b * HEADS, s, s) if self.kind == "view_first" else scores
        scores.masked_fill_((mask == 0)[:, None, None, :].expand_as(scores), torch.finfo(scores.dtype).min)
        weights = torch.softmax(seen.float(), dim=-1).type_as(scores).view(b, HEADS, s, s)
        return (weights @ v).transpose(1, 2).reshape(b, s, DIM)


class WholeShapeReads(nn.Module):
    """A token-id stack written as HF 4.x models are: sizes read as one tuple (``b, s = h.shape[:2]``) and the mask
    cast to the dtype of the embedded tokens, which plain fx and transformers 4's fx tracer record as whole-shape and
    dtype reads of values in the middle of the stack."""

    def __init__(self, vocab=50, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, DIM)
        self.qkv = nn.ModuleList(nn.Linear(DIM, 3 * DIM) for _ in range(layers))
        self.out = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(DIM) for _ in range(layers))

    def forward(self, ids, mask):
        h = self.embed(ids)
        bias = (1.0 - mask[:, None, None, :].to(h.dtype)) * -10000.0
        for qkv, out, norm in zip(self.qkv, self.out, self.norms):
            size = h.shape[:2]  # plain fx cannot unpack a traced tuple: indexed
            b, s, t = size[0], size[1], qkv(h)
            q, k, v = (t[..., i * DIM:(i + 1) * DIM].view(b, s, HEADS, -1).transpose(1, 2) for i in range(3))
            scores = q @ k.transpose(-1, -2) / math.sqrt(h.size()[-1] // HEADS) + bias
            h = norm(h + out((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, -1)))
        return h


class RelativeScoreStack(nn.Module):
    """Blocks adding to Q·Kᵀ a term computed from Q itself, as DeBERTa's content-to-position term:
    ``gather(q @ pos_kᵀ, -1, relative position)`` (``kind="c2p"``), or as BERT's ``relative_key``:
    ``einsum("bhld,lrd->bhlr", q, distance embeddings)`` (``kind="einsum"``). Near-miss twin ``kind="mean_keys"``:
    the term is Q against the keys averaged over the sequence, which reads every position, padded ones included."""

    def __init__(self, kind, layers=2, span=4):
        super().__init__()
        self.kind, self.span = kind, span
        self.qkv = nn.ModuleList(nn.Linear(DIM, 3 * DIM) for _ in range(layers))
        self.pos = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(layers))
        self.table = nn.Parameter(torch.randn(2 * span, DIM))
        self.distance = nn.Embedding(2 * span, DIM // HEADS)
        self.norms = nn.ModuleList(nn.LayerNorm(DIM) for _ in range(layers))

    def forward(self, x, mask):
        b, s, e = x.shape
        d = e // HEADS
        padded = mask[:, None, None, :] == 0
        pos = torch.arange(s, device=x.device)
        index = (pos[:, None] - pos[None, :]).clamp(-self.span, self.span - 1) + self.span  # [s, s]
        for qkv, pos_proj, norm in zip(self.qkv, self.pos, self.norms):
            q, k, v = (t.view(b, s, HEADS, d).transpose(1, 2) for t in qkv(x).chunk(3, dim=-1))
            if self.kind == "c2p":
                pos_k = pos_proj(self.table).view(2 * self.span, HEADS, d).transpose(0, 1)  # [h, 2·span, d]
                term = torch.gather(q @ pos_k.transpose(-1, -2), -1, index.expand(b, HEADS, s, s))
            elif self.kind == "einsum":
                term = torch.einsum("bhld,lrd->bhlr", q, self.distance(index))
            else:
                term = q @ k.mean(2, keepdim=True).transpose(-1, -2)  # [b, h, s, 1]
            scores = ((q @ k.transpose(-1, -2) + term) / math.sqrt(d)).masked_fill(padded, torch.finfo(x.dtype).min)
            x = norm(x + (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, e))
        return x
