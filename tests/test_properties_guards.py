"""Property-based tests of the guards: whatever the example's sizes and whatever happens after optimizing,
no call is served by a graph captured for other conditions.

hypothesis draws a transformer stack (from test_properties' styles) with a mask built from sizes and
constants on top of its padding mask — causal, causal with an offset, a sliding window shorter than,
as long as or longer than the example, per-head ALiBi biases — an example whose sizes are 1 or coincide
(batch == sequence), then a sequence of events: calls of other sizes, a replaced weight, a switch to
training mode and back. Every call must match the model's own forward (on real tokens; every position
where no padding is removed), and every graph the model holds must be one captured for the call's kind.
300 examples run by default (FXBT_GUARD_EXAMPLES changes that); ``python -m pytest -m nightly`` runs 3,000.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxbt
from fxbt.optimized import detached
from test_properties import Layer, Style, styles

EXAMPLES = int(os.environ.get("FXBT_GUARD_EXAMPLES", "300"))
NIGHTLY_EXAMPLES = 3000
TOL = 1e-5


@dataclass(frozen=True)
class Structure:
    kind: str  # "none", "causal", "offset", "window", "alibi"
    size: int  # the offset or the window


class StructuredLayer(Layer):
    """A generated layer whose scores also get a mask built from sizes and constants."""

    def __init__(self, style: Style, structure: Structure):
        super().__init__(style)
        self.structure = structure

    def attention(self, x, mask):
        s, (b, n, e) = self.s, x.shape
        q, k, v = (self.heads(t, b, n) for t in self.projections(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(s.head_dim)
        scores = scores + (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(torch.float32).min
        scores = scores + self.structural(n, x.dtype, x.device)
        out = torch.softmax(scores, dim=-1) @ v
        return self.o(out.transpose(1, 2).reshape(b, n, e))

    def projections(self, x):
        e = self.e
        if self.s.fused_qkv:
            qkv = self.qkv(x)
            return qkv[..., :e], qkv[..., e:2 * e], qkv[..., 2 * e:]
        return self.q(x), self.k(x), self.v(x)

    def structural(self, n, dtype, device):
        kind, size = self.structure.kind, self.structure.size
        pos = torch.arange(n, device=device)
        i, j = pos[:, None], pos[None, :]
        if kind == "none":
            return torch.zeros((), dtype=dtype, device=device)
        if kind == "alibi":
            slopes = 2.0 ** -torch.arange(1, self.s.heads + 1, dtype=dtype, device=device)
            return -slopes[:, None, None] * (i - j).abs().to(dtype)
        keep = {"causal": j <= i, "offset": j <= i + size, "window": (j <= i) & (i - j < size)}[kind]
        return torch.zeros((), dtype=dtype, device=device).masked_fill(~keep, float("-inf")).expand(n, n)


class StructuredStack(nn.Module):
    def __init__(self, style: Style, structure: Structure):
        super().__init__()
        self.layers = nn.ModuleList(StructuredLayer(style, structure) for _ in range(style.layers))

    def forward(self, x, mask):
        for layer in self.layers:
            x = layer(x, mask)
        return x


structures = st.builds(Structure, kind=st.sampled_from(["none", "causal", "offset", "window", "alibi"]),
                       size=st.integers(1, 6))


@st.composite
def sizes(draw, kind=None):
    """Batch and sequence: 1, equal to each other, or anything."""
    kind = kind or draw(st.sampled_from(["batch_one", "sequence_one", "equal", "any"]))
    if kind == "batch_one":
        return 1, draw(st.integers(1, 9))
    if kind == "sequence_one":
        return draw(st.integers(1, 4)), 1
    if kind == "equal":
        n = draw(st.integers(1, 6))
        return n, n
    return draw(st.integers(1, 4)), draw(st.integers(1, 9))


@st.composite
def batches(draw, e, size):
    b, n = size
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


events = st.lists(st.sampled_from(["call", "call", "call", "replace_weight", "train", "eval"]), min_size=2,
                  max_size=6)
_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=_HEALTH)
@given(style=styles, structure=structures, data=st.data())
def test_no_call_is_served_outside_its_guards(style, structure, data):
    check(style, structure, data)


@pytest.mark.nightly
@settings(max_examples=NIGHTLY_EXAMPLES, deadline=None, suppress_health_check=_HEALTH)
@given(style=styles, structure=structures, data=st.data())
def test_no_call_is_served_outside_its_guards_nightly(style, structure, data):
    check(style, structure, data)


def check(style, structure, data):
    torch.manual_seed(0)
    model = StructuredStack(style, structure).eval()
    e = style.heads * style.head_dim
    optimized = fxbt.optimize(model, data.draw(batches(e, data.draw(sizes()))), frontend="fx")
    for event in data.draw(events):
        if event == "replace_weight":
            layer = optimized.layers[data.draw(st.integers(0, style.layers - 1))]
            linear = layer.o
            linear.weight = nn.Parameter(torch.randn_like(linear.weight) * 0.1)
        elif event in ("train", "eval"):
            getattr(optimized, event)()
        else:
            _call_matches(optimized, data.draw(batches(e, data.draw(sizes()))), structure)


def _call_matches(optimized, inputs, structure):
    x, mask = inputs
    with torch.no_grad():
        got = optimized(x, mask)
        with detached(optimized):
            want = optimized(x, mask)
    real = mask[..., None].bool()
    nan_rows = torch.isnan(want)
    assert torch.equal(nan_rows, torch.isnan(got)), "NaN where the original has none, or the reverse"
    err = torch.where(real & ~nan_rows, (want - got).abs(), torch.zeros_like(want)).max().item()
    assert err < TOL, (structure, tuple(x.shape), err, str(fxbt.report(optimized)))
