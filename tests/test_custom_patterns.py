"""Users' own patterns: registration, its errors, selection per call, report and unroll.

The two worked examples of the README: a hand-written RMSNorm becomes torch.nn.functional.rms_norm, and
quick-gelu ``x * sigmoid(1.702 x)`` becomes one fused call.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxbt


# --- worked example 1: RMSNorm -------------------------------------------------------------------
def rms_norm_pattern(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rms_norm_replacement(x, weight, eps):
    return F.rms_norm(x, x.shape[-1:], weight, eps)


# --- worked example 2: quick-gelu ----------------------------------------------------------------
@torch.library.custom_op("fxbt_examples::quick_gelu", mutates_args=())
def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x) in one call, computed in place on one temporary."""
    return torch.sigmoid(x * 1.702).mul_(x)


@quick_gelu.register_fake
def _(x):
    return torch.empty_like(x)


def quick_gelu_pattern(x):
    return x * torch.sigmoid(1.702 * x)


def quick_gelu_replacement(x):
    return quick_gelu(x)


class RMSNorm(nn.Module):
    def __init__(self, dim=16, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.rand(dim) + 0.5), eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class Mixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.lin = RMSNorm(), nn.Linear(16, 16)

    def forward(self, x):
        h = self.lin(self.norm(x))
        return h * torch.sigmoid(1.702 * h)


@pytest.fixture
def registered():
    rules = [fxbt.register_pattern("rms_norm", rms_norm_pattern, rms_norm_replacement),
             fxbt.register_pattern("quick_gelu", quick_gelu_pattern, quick_gelu_replacement)]
    yield rules
    for rule in rules:
        fxbt.unregister_pattern(rule.name)


def test_worked_examples_rewrite_report_and_unroll(registered):
    model = Mixer().eval()
    x = torch.randn(3, 5, 16)
    gm = fxbt.optimize(model, (x,), inplace=False)
    report = fxbt.report(gm)
    assert {r.kernel for r in report.rewritten()} == {"rms_norm", "quick_gelu"}
    graph_code = fxbt.api.graph_module(gm).code
    code = graph_code + "".join(m.original.code for _, m in fxbt.region.regions(gm))
    assert "rsqrt" not in graph_code and "sigmoid" not in graph_code and "rsqrt" in code
    y = torch.randn(2, 9, 16)
    with torch.no_grad():
        assert (gm(y) - model(y)).abs().max().item() < 1e-5
        assert torch.equal(fxbt.unroll(gm)(y), model(y))
    region = next(m for _, m in fxbt.region.regions(gm) if m.kernel == "quick_gelu")
    gm(y)
    assert region.last_path == "replacement"


def test_decorator_form_and_per_call_selection():
    @fxbt.register_pattern("double_relu", replacement=lambda x: torch.relu(x) * 2)
    def double_relu(x):
        return torch.relu(x) + torch.relu(x)

    try:
        class M(nn.Module):
            def forward(self, x):
                return torch.relu(x) + torch.relu(x)

        x = torch.randn(4)
        assert fxbt.report(fxbt.optimize(M(), (x,))).rewritten()[0].pattern == "double_relu"
        assert not fxbt.report(fxbt.optimize(M(), (x,), patterns=["softmax_attention"])).rows
        chosen = fxbt.optimize(M(), (x,), patterns=["defaults"])
        assert fxbt.report(chosen).rewritten()[0].pattern == "double_relu"
    finally:
        fxbt.unregister_pattern("double_relu")


def test_registration_errors_say_what_to_fix():
    with pytest.raises(fxbt.PatternError, match="already registered"):
        fxbt.register_pattern("dup", quick_gelu_pattern, quick_gelu_replacement)
        fxbt.register_pattern("dup", quick_gelu_pattern, quick_gelu_replacement)
    fxbt.unregister_pattern("dup")
    with pytest.raises(fxbt.PatternError, match="built-in"):
        fxbt.register_pattern("softmax_attention", quick_gelu_pattern, quick_gelu_replacement)
    with pytest.raises(fxbt.PatternError, match="never used"):
        fxbt.register_pattern("unused", lambda x, y: torch.relu(x), lambda x, y: x)
    with pytest.raises(fxbt.PatternError, match="same parameters"):
        fxbt.register_pattern("mismatch", quick_gelu_pattern, lambda y, z: y)
    with pytest.raises(fxbt.PatternError, match="replacement"):
        fxbt.register_pattern("nothing")
    with pytest.raises(fxbt.PatternError, match="unknown pattern"):
        fxbt.optimize(Mixer(), (torch.randn(2, 16),), patterns=["no_such_rule"])
