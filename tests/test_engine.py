"""The engine itself: canonical view, matcher features, rules and their errors, regions and unroll."""
from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

import fxbt
from fxbt.canon import CanonicalGraph
from fxbt.matcher import find_matches
from fxbt.meta import propagate
from fxbt.pattern import PatternGraph


def _graph(fn, *example):
    gm = torch.fx.symbolic_trace(fn)
    propagate(gm, list(example))
    return gm, CanonicalGraph(gm)


def _matches(pattern, fn, *example):
    _, graph = _graph(fn, *example)
    return list(find_matches(PatternGraph.trace(pattern, "p"), graph))


def test_dialects_share_one_vocabulary():
    lin = nn.Linear(4, 4)

    class Forms(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            a = self.lin(x) + F.linear(x, lin.weight, lin.bias)
            b = torch.bmm(a, a.transpose(1, 2)) + (a @ a.permute(0, 2, 1)) + torch.einsum("bij,bkj->bik", a, a)
            return b.softmax(-1) + F.softmax(b, dim=2) + torch.softmax(b, 2)

    gm = torch.fx.symbolic_trace(Forms())
    propagate(gm, [torch.randn(2, 3, 4)])
    graph = CanonicalGraph(gm)
    assert len(graph.by_op["linear"]) == 2
    assert len(graph.by_op["matmul"]) == 3
    assert len(graph.by_op["softmax"]) == 3
    assert {graph.canon(k).attrs["dim"] for k in graph.by_op["softmax"]} == {-1}
    # the einsum's transposed operand is a virtual transpose node, like the explicit ones
    assert len([k for k in graph.by_op["transpose"] if graph.canon(k).attrs["dims"] == (-2, -1)]) == 3


def test_commutative_operands_match_both_orders():
    def pattern(x, y):
        return torch.relu(x + y)

    def model(a, b):
        return torch.relu(b + a * 2)

    found = _matches(pattern, model, torch.randn(3), torch.randn(3))
    assert len(found) == 1
    assert found[0].bindings["y"].name == "mul" or found[0].bindings["x"].name == "mul"


def test_transparent_ops_are_looked_through_and_kept_in_the_match():
    def pattern(x):
        return torch.softmax(x, dim=-1) @ x

    def model(x):
        return F.dropout(torch.softmax(x, dim=-1).contiguous().float(), 0.1, False) @ x

    found = _matches(pattern, model, torch.randn(2, 3, 3))
    assert len(found) == 1
    assert {n.name for n in found[0].nodes()} >= {"softmax", "contiguous", "float_1", "dropout"}


def test_constraints_on_constants_decline_a_different_axis():
    def pattern(x):
        return torch.softmax(x, dim=-1) @ x

    def model(x):
        return torch.softmax(x, dim=1) @ x  # dim 1 of a 3-d tensor is not the last axis

    assert _matches(pattern, model, torch.randn(2, 3, 3)) == []


def test_chain_matches_any_number_of_modifiers():
    def pattern(q, k):
        return torch.softmax(fxbt.chain(q @ k), dim=-1)

    def none(q, k):
        return torch.softmax(q @ k, dim=-1)

    def three(q, k):
        return torch.softmax(((q @ k) / 2.0 + 1.0).masked_fill(q[:, :1] > 0, -1e9), dim=-1)

    for model, length in [(none, 0), (three, 3)]:
        found = _matches(pattern, model, torch.randn(3, 3), torch.randn(3, 3))
        assert len(found) == 1 and len(found[0].chains["chain"]) == length


def test_wildcard_used_twice_must_bind_one_value():
    def pattern(x):
        return x * x

    assert len(_matches(pattern, lambda a: a * a, torch.randn(3))) == 1
    assert _matches(pattern, lambda a: a * (a + 1), torch.randn(3)) == []


def test_rule_errors_say_what_to_fix():
    def pattern(x, unused):
        return torch.relu(x)

    with pytest.raises(fxbt.PatternError, match="never used"):
        fxbt.Rule("bad_unused", pattern, lambda x, unused: x)

    def p(x, y):
        return x + y

    def r(x):
        return x

    with pytest.raises(fxbt.PatternError, match="same parameters"):
        fxbt.Rule("bad_signature", p, r)

    with pytest.raises(fxbt.PatternError, match="one computed tensor"):
        fxbt.Rule("bad_return", lambda x: x, lambda x: x)


def test_matching_cost_follows_anchors_not_graph_size():
    """Each pattern is tried only at its anchor op: a graph with no softmax is never walked."""
    calls = []

    class Spy(CanonicalGraph):
        def operands(self, key):
            calls.append(key)
            return super().operands(key)

    def model(x):
        for _ in range(50):
            x = torch.relu(x @ x)
        return x

    gm = torch.fx.symbolic_trace(model)
    propagate(gm, [torch.randn(3, 3)])
    from fxbt.patterns.attention import RULES
    list(find_matches(RULES[0].graph, Spy(gm)))
    # 50 matmul anchors, each rejected after a couple of operand look-ups
    assert len(calls) <= 3 * 50


def test_unroll_restores_names_order_and_bits():
    from handwritten import EinsumFusedQKV, inputs
    model = EinsumFusedQKV().eval()
    captured = fxbt.capture(model, inputs()).gm
    gm = fxbt.api.graph_module(fxbt.optimize(model, inputs()))
    assert any(n.op == "call_module" and n.target.startswith("fxbt_region") for n in gm.graph.nodes)
    unrolled = fxbt.unroll(gm)
    assert [(n.op, str(n.target), n.name) for n in unrolled.graph.nodes] == \
           [(n.op, str(n.target), n.name) for n in captured.graph.nodes]
    x, mask = inputs(3, 12, seed=4)
    assert torch.equal(unrolled(x, mask), captured(x, mask))


def test_region_falls_back_to_the_original_when_its_rule_says_so():
    calls = []

    def pattern(x):
        return torch.relu(x) * 2

    def replacement(x):
        calls.append("replacement")
        return torch.relu(x) * 2

    rule = fxbt.Rule("relu_times_two", pattern, replacement,
                     fallback=lambda region, inputs: "negative input" if inputs[0].sum() < 0 else None)

    class M(nn.Module):
        def forward(self, x):
            return torch.relu(x) * 2 + 1

    gm = fxbt.optimize(M(), (torch.ones(3),), patterns=[rule])
    assert fxbt.report(gm).rewritten()[0].kernel == "relu_times_two"
    calls.clear()  # verification ran the replacement once on the example
    region = next(m for _, m in fxbt.region.regions(gm))
    assert torch.equal(gm(torch.ones(3)), torch.full((3,), 3.0)) and region.last_path == "replacement"
    assert torch.equal(gm(-torch.ones(3)), torch.ones(3)) and region.last_path == "negative input"
    assert calls == ["replacement"]


class _MaskPerLayer(nn.Module):
    """A mask built again for each of two layers, as T5 builds its biased mask; ``write`` puts an in-place op
    (or a module fxbt cannot see into) between the two."""

    def __init__(self, write=None):
        super().__init__()
        self.write = write
        self.opaque = _Opaque()

    def forward(self, x, keep):
        first = torch.where(keep, x, -1.0).contiguous()
        if self.write == "in_place":
            x.add_(1.0)
        elif self.write == "module":
            self.opaque(x)
        second = torch.where(keep, x, -1.0).contiguous()
        third = torch.where(keep, x, -2.0).contiguous()
        return first, second, third


class _Opaque(nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize("write", [None, "in_place", "module"])
def test_values_computed_alike_share_a_key_only_where_nothing_writes_between(write):
    from fxbt.values import ValueKeys

    class KeepOpaque(torch.fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, _Opaque) or super().is_leaf_module(m, name)

    model = _MaskPerLayer(write)
    gm = torch.fx.GraphModule(model, KeepOpaque().trace(model))
    first, second, third = [n for n in gm.graph.nodes if n.target == "contiguous"]
    keys = ValueKeys(gm.graph)
    assert (keys.key(first) == keys.key(second)) is (write is None)
    assert keys.key(second) != keys.key(third)  # near-miss: another fill value
