"""Hand-written attention in several code styles is rewritten; near-miss twins are left alone."""
from __future__ import annotations

import pytest
import torch

import fxbt
import handwritten as hw
from conftest import identical, max_error


@pytest.mark.parametrize("frontend", ["dynamo", "fx"])
@pytest.mark.parametrize("style", hw.STYLES, ids=lambda c: c.__name__)
def test_style_is_rewritten_and_exact(style, frontend):
    torch.manual_seed(0)
    model = style().eval()
    if frontend == "fx" and not getattr(style, "fx_traceable", True):
        with pytest.raises(fxbt.CaptureError, match="- fx: "):
            fxbt.optimize(model, hw.inputs(), frontend=frontend)
        return
    gm = fxbt.optimize(model, hw.inputs(), frontend=frontend, inplace=False)
    report = fxbt.report(gm)
    assert report.frontend == frontend
    assert len(report.rewritten("sdpa")) == 1, str(report)
    for batch, seq in [(3, 11), (1, 1), (2, 30)]:
        x, mask = hw.inputs(batch, seq, seed=batch + seq)
        with torch.no_grad():  # padded positions: zeros where the stack runs padding-free
            assert ((model(x, mask) - gm(x, mask)).abs() * mask[..., None]).max().item() < 1e-5
            assert identical(fxbt.unroll(gm)(x, mask), model(x, mask))


@pytest.mark.parametrize("frontend", ["dynamo", "fx"])
def test_blocked_local_attention_is_rewritten_per_block(frontend):
    """5-d einsums (a block axis between heads and positions) are one SDPA over the blocks, with the mask."""
    torch.manual_seed(0)
    model = hw.BlockedLocal().eval()
    gm = fxbt.optimize(model, hw.inputs(2, 8), frontend=frontend, inplace=False)
    report = fxbt.report(gm)
    assert len(report.rewritten("sdpa")) == 1, str(report)
    for batch, seq in [(3, 12), (1, 4), (2, 20)]:
        x, mask = hw.inputs(batch, seq, seed=batch + seq)
        with torch.no_grad():
            assert ((model(x, mask) - gm(x, mask)).abs() * mask[..., None]).max().item() < 1e-5
            assert identical(fxbt.unroll(gm)(x, mask), model(x, mask))


@pytest.mark.parametrize("equation, plan", [
    ("bqhd,bkhd->bhqk", ([0, 2, 1, 3], [0, 2, 1, 3], True, [0, 1, 2, 3])),  # Q·Kᵀ, heads third
    ("bhqk,bkhd->bqhd", ([0, 1, 2, 3], [0, 2, 1, 3], False, [0, 2, 1, 3])),  # P·V, output permuted
    ("bhqd,bhkd->bhqk", None),  # matmul's layout with the right transposed: read by the canonical view
    ("bhqk,bhkd->bhqd", None),  # matmul's own layout
    ("bqhd,bkhd->bqk", None),  # two contracted axes: not one matrix product
    ("bhqd,bhkd->bhqkd", None),  # nothing contracted
    ("bii,bij->bij", None),  # a diagonal
])
def test_einsum_written_out_only_where_it_is_one_product_in_another_layout(equation, plan):
    from fxbt import einsums
    assert einsums._plan(equation, any_layout=False) == plan


def test_grouped_query_uses_enable_gqa_without_repeating():
    model = hw.GroupedQuery().eval()
    gm = fxbt.optimize(model, hw.inputs(), inplace=False)
    region = next(m for _, m in fxbt.region.regions(gm))
    assert region.params["gqa"] is True
    k_shape = region.original.graph  # the repeated keys stay inside the region's original only
    assert any(n.target == "repeat_interleave" for n in k_shape.nodes)
    assert not any(n.target == "repeat_interleave" for n in fxbt.api.graph_module(gm).graph.nodes)


def test_causal_tril_buffer_becomes_is_causal(monkeypatch):
    model = hw.NanoGPTCausal().eval()
    gm = fxbt.optimize(model, hw.inputs(pad=False), inplace=False)
    region = next(m for _, m in fxbt.region.regions(gm) if m.kernel == "sdpa")
    assert region.params["causal"] is True
    assert fxbt.report(gm).rewritten("sdpa")[0].reason.startswith("is_causal")
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(k.get("is_causal")) or real_sdpa(*a, **k))
    x, mask = hw.inputs(2, 12, pad=False)
    with torch.no_grad():
        assert max_error(model(x, mask), gm(x, mask)) < 1e-5
    assert calls == [True]


def test_causal_plus_padding_is_not_claimed_causal():
    gm = fxbt.optimize(hw.SplitScaleWhere().eval(), hw.inputs(), inplace=False)
    region = next(m for _, m in fxbt.region.regions(gm))
    assert region.params["causal"] is False


@pytest.mark.parametrize("twin", list(hw.NEAR_MISSES), ids=lambda c: c.__name__)
def test_near_miss_is_left_alone(twin):
    torch.manual_seed(0)
    model = twin().eval()
    x, mask = hw.inputs()
    gm = fxbt.optimize(model, (x, mask), inplace=False)
    report = fxbt.report(gm)
    assert not report.rewritten(), str(report)
    reason = hw.NEAR_MISSES[twin]
    if reason is None:
        assert not report.rows, str(report)
    else:
        assert any(reason in r.reason for r in report.rejected("sdpa")), str(report)
    x2, mask2 = hw.inputs(3, 9, seed=5)
    with torch.no_grad():
        assert identical(gm(x2, mask2), model(x2, mask2))


def test_a_causal_mask_is_built_only_when_a_region_needs_it(monkeypatch):
    """A mask built from sizes alone is built once per size, to prove it causal there; calls at a size
    already proven use is_causal and never build it."""
    from fxbt.patterns import attention
    model = hw.NanoGPTCausal().eval()
    gm = fxbt.optimize(model, hw.inputs(pad=False), inplace=False)
    deferred = [m for _, m in fxbt.region.regions(gm) if m.kernel == "deferred"]
    assert len(deferred) == 1
    computed = []
    real_value = attention.Deferred.value
    monkeypatch.setattr(attention.Deferred, "value", lambda self: computed.append(1) or real_value(self))
    x, mask = hw.inputs(2, 12, pad=False)
    with torch.no_grad():
        assert max_error(model(x, mask), gm(x, mask)) < 1e-5  # a new size: built once, to prove it causal
        assert computed == [1]
        x, mask = hw.inputs(3, 12, pad=False, seed=4)
        assert max_error(model(x, mask), gm(x, mask)) < 1e-5  # the same sequence length: not built again
        assert identical(fxbt.unroll(gm)(x, mask), model(x, mask))
    assert computed == [1]


@pytest.mark.parametrize("kind", ["plain", "view_first"])
def test_scores_masked_in_place(kind):
    """The write becomes out of place where nothing else sees the scores' memory (the attention is then found);
    the near-miss twin reads a view taken before the write: left in place, and still exact."""
    model = hw.InPlaceMasked(kind).eval()
    x, mask = hw.inputs(3, 9)
    gm = fxbt.optimize(model, (x, mask), inplace=False)
    report = fxbt.report(gm)
    assert bool(report.rewritten("sdpa")) is (kind == "plain"), str(report)
    x, mask = hw.inputs(4, 12, seed=4)
    with torch.no_grad():
        assert ((model(x, mask) - gm(x, mask)).abs() * mask[..., None]).max().item() < 1e-5  # padded rows: zeros
        assert identical(fxbt.unroll(fxbt.api.graph_module(gm))(x, mask), model(x, mask))
