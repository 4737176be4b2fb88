"""Property-based tests: generated transformer stacks, in many code styles, stay exact after fxbt.

hypothesis draws the hidden size, heads, layers, pre or post norm, where the scale is applied, the mask
style, biases on or off, the activation, fused or separate QKV and the padding of the inputs; for every
draw the optimized module must match the original on real tokens and unroll must be bit-identical.
200 examples run by default (FXBT_HYPOTHESIS_EXAMPLES changes that); the ``nightly`` marker runs 2,000:
``python -m pytest -m nightly``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxbt

EXAMPLES = int(os.environ.get("FXBT_HYPOTHESIS_EXAMPLES", "200"))
NIGHTLY_EXAMPLES = 2000


@dataclass(frozen=True)
class Style:
    heads: int
    head_dim: int
    layers: int
    pre_norm: bool
    scale_at: str  # "scores_div", "scores_mul", "query", "split", "none"
    mask: str  # "additive", "masked_fill", "where", "none"
    bias: bool
    activation: str  # "gelu", "relu", "silu", "tanh_gelu"
    fused_qkv: bool


class Layer(nn.Module):
    def __init__(self, s: Style):
        super().__init__()
        e = s.heads * s.head_dim
        self.s, self.e = s, e
        if s.fused_qkv:
            self.qkv = nn.Linear(e, 3 * e, bias=s.bias)
        else:
            self.q, self.k, self.v = (nn.Linear(e, e, bias=s.bias) for _ in range(3))
        self.o = nn.Linear(e, e, bias=s.bias)
        self.ff1, self.ff2 = nn.Linear(e, 2 * e, bias=s.bias), nn.Linear(2 * e, e, bias=s.bias)
        self.ln1, self.ln2 = nn.LayerNorm(e), nn.LayerNorm(e)

    def heads(self, t, b, n):
        return t.view(b, n, self.s.heads, self.s.head_dim).transpose(1, 2)

    def attention(self, x, mask):
        s, (b, n, e) = self.s, x.shape
        if s.fused_qkv:
            qkv = self.qkv(x)
            q, k, v = qkv[..., :e], qkv[..., e:2 * e], qkv[..., 2 * e:]
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q, k, v = self.heads(q, b, n), self.heads(k, b, n), self.heads(v, b, n)
        d = s.head_dim
        if s.scale_at == "query":
            q = q * d ** -0.5
        elif s.scale_at == "split":
            q, k = q * d ** -0.25, k * d ** -0.25
        scores = q @ k.transpose(-2, -1)
        if s.scale_at == "scores_div":
            scores = scores / math.sqrt(d)
        elif s.scale_at == "scores_mul":
            scores = scores * d ** -0.5
        keep = mask[:, None, None, :]
        if s.mask == "additive":
            scores = scores + (1.0 - keep.to(torch.float32)) * torch.finfo(torch.float32).min
        elif s.mask == "masked_fill":
            scores = scores.masked_fill(keep == 0, float("-inf"))
        elif s.mask == "where":
            scores = torch.where(keep.bool(), scores, torch.tensor(-1e9))
        out = torch.softmax(scores, dim=-1) @ v
        return self.o(out.transpose(1, 2).reshape(b, n, e))

    def act(self, x):
        return {"gelu": F.gelu, "relu": F.relu, "silu": F.silu,
                "tanh_gelu": lambda t: F.gelu(t, approximate="tanh")}[self.s.activation](x)

    def forward(self, x, mask):
        if self.s.pre_norm:
            h = x + self.attention(self.ln1(x), mask)
            return h + self.ff2(self.act(self.ff1(self.ln2(h))))
        h = self.ln1(x + self.attention(x, mask))
        return self.ln2(h + self.ff2(self.act(self.ff1(h))))


class Stack(nn.Module):
    def __init__(self, s: Style):
        super().__init__()
        self.layers = nn.ModuleList(Layer(s) for _ in range(s.layers))

    def forward(self, x, mask):
        for layer in self.layers:
            x = layer(x, mask)
        return x


styles = st.builds(
    Style, heads=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([4, 8]), layers=st.integers(1, 3),
    pre_norm=st.booleans(), scale_at=st.sampled_from(["scores_div", "scores_mul", "query", "split", "none"]),
    mask=st.sampled_from(["additive", "masked_fill", "where", "none"]), bias=st.booleans(),
    activation=st.sampled_from(["gelu", "relu", "silu", "tanh_gelu"]), fused_qkv=st.booleans())


@st.composite
def batches(draw, e):
    b, n = draw(st.integers(1, 4)), draw(st.integers(1, 9))
    lengths = [draw(st.integers(1, n)) for _ in range(b)]
    left = draw(st.booleans())
    mask = torch.zeros(b, n, dtype=torch.long)
    for row, length in enumerate(lengths):
        if left:
            mask[row, n - length:] = 1
        else:
            mask[row, :length] = 1
    x = torch.randn(b, n, e, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    return x, mask


_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=_HEALTH)
@given(style=styles, data=st.data())
def test_generated_stacks_stay_exact(style, data):
    check_style(style, data)


@pytest.mark.nightly
@settings(max_examples=NIGHTLY_EXAMPLES, deadline=None, suppress_health_check=_HEALTH)
@given(style=styles, data=st.data())
def test_generated_stacks_stay_exact_nightly(style, data):
    check_style(style, data)


def check_style(style, data):
    torch.manual_seed(0)
    model = Stack(style).eval()
    e = style.heads * style.head_dim
    example = data.draw(batches(e))
    gm = fxbt.optimize(model, example, frontend="fx", inplace=False)
    report = fxbt.report(gm)
    assert len(report.rewritten("sdpa")) + len(report.rewritten("fused_encoder")) >= 1 or style.layers == 0
    x, mask = data.draw(batches(e))
    with torch.no_grad():
        want, got = model(x, mask), gm(x, mask)
        err = ((want - got).abs() * mask[..., None]).max().item()
        assert err < 1e-5, (style, err, str(report))
        assert torch.equal(fxbt.unroll(gm)(x, mask), want)
