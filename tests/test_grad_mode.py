"""Eval-mode calls with gradients enabled run the graph without recording, and again for a backward
(fxbt/recompute.py): as fast as under no_grad, with the graph's own gradients when a backward does come."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import fxbt
import zoo
from fxbt import recompute
from fxbt.optimized import detached
from fxbt.region import regions

TOL = 1e-5


@contextlib.contextmanager
def counting_saved_tensors():
    """How many tensors autograd keeps for a backward while the block runs."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        yield saved


def _loss(out, mask):
    hidden = out.last_hidden_state
    weights = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0))
    return (hidden * weights * mask[..., None]).sum()


def _close(got, want):
    """Within 1e-5 of the largest entry of the model's own gradient (sums over many tokens reach it)."""
    assert (got is None) == (want is None)
    return got is None or (got - want).abs().max().item() <= TOL * max(1.0, want.abs().max().item())


class _Noisy(torch.nn.Module):
    def __init__(self, train_dropout):
        super().__init__()
        self.linear, self.train_dropout = torch.nn.Linear(4, 4), train_dropout

    def forward(self, x):
        return F.dropout(self.linear(x), 0.5, self.train_dropout)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_eval_call_with_gradients_records_nothing_and_backward_gives_the_models_gradients(name):
    spec = zoo.SPECS[name]
    model = spec.build(num_hidden_layers=2).eval()
    gm = fxbt.optimize(model, spec.example(), inplace=False)
    inputs = spec.probe()
    mask = inputs["attention_mask"]
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_()
    call = {"inputs_embeds": embeds, "attention_mask": mask}
    n_parameters = len(list(model.parameters()))
    with counting_saved_tensors() as saved:
        got = gm(**call)
    # the inputs and parameters for the backward's second run, and no activation
    assert 0 < len(saved) <= n_parameters + 2, len(saved)
    assert got.last_hidden_state.requires_grad
    assert all(r.last_path == "replacement" for _, r in regions(gm)), [r.last_path for _, r in regions(gm)]
    with detached(model), counting_saved_tensors() as saved_by_model:
        want = model(**call)
    assert len(saved_by_model) > n_parameters + 2  # the near-miss twin: the model records activations
    wrt = [embeds] + list(model.parameters())
    got_grads = torch.autograd.grad(_loss(got, mask), wrt, allow_unused=True)
    want_grads = torch.autograd.grad(_loss(want, mask), wrt, allow_unused=True)
    assert got_grads[0].abs().sum() > 0
    assert all(_close(g, w) for g, w in zip(got_grads, want_grads))


def test_backward_accumulates_into_parameters_and_follows_requires_grad_set_after_optimize():
    spec = zoo.SPECS["bert"]
    model = spec.build(num_hidden_layers=2).eval()
    gm = fxbt.optimize(model, spec.example(), inplace=False)
    inputs = spec.probe()
    for p in model.parameters():
        p.requires_grad_(False)
    chosen = model.encoder.layer[1].output.dense.weight
    chosen.requires_grad_(True)  # fine-tuning one layer, decided after optimize
    _loss(gm(**inputs), inputs["attention_mask"]).backward()
    got = chosen.grad.clone()
    chosen.grad = None
    with detached(model):
        _loss(model(**inputs), inputs["attention_mask"]).backward()
    assert got.abs().sum() > 0 and _close(got, chosen.grad)
    assert all(p.grad is None for p in model.parameters() if p is not chosen)


def test_double_backward_through_the_second_run():
    """A gradient penalty differentiates a gradient: the backward's run is itself differentiable. (A graph
    with SDPA cannot be: torch's CPU flash attention has no double backward, as with the model's own sdpa.)"""
    model = _Noisy(train_dropout=False).eval()
    gm = fxbt.optimize(model, (torch.randn(2, 4),), inplace=False, frontend="fx")
    x = torch.randn(3, 4, requires_grad=True)

    def penalty_gradient(run):
        first, = torch.autograd.grad(run(x).tanh().sum(), x, create_graph=True)
        return torch.autograd.grad(first.square().sum(), model.linear.weight)[0]

    got = penalty_gradient(gm)
    with detached(model):
        want = penalty_gradient(model)
    assert fxbt.optimized.installed(gm).specializations[0].replayable
    assert got.abs().sum() > 0 and _close(got, want)


def test_training_mode_and_random_ops_record_as_before():
    """Near-miss twins: a graph that would not compute the same values again is never run twice."""
    spec = zoo.SPECS["bert"]
    model = spec.build(num_hidden_layers=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    gm = fxbt.optimize(model, spec.example(), inplace=False)
    with counting_saved_tensors() as saved:
        gm(**spec.probe())
    assert len(saved) > len(list(model.parameters())) + 2
    assert all(not s.replayable for s in fxbt.optimized.installed(gm).specializations)


@pytest.mark.parametrize("train_dropout, replayable", [(False, True), (True, False)])
def test_dropout_counts_as_random_only_where_it_trains(train_dropout, replayable):
    """(A model whose eval-mode forward draws random numbers is refused at capture: it does not reproduce.)"""
    graph = torch.fx.symbolic_trace(_Noisy(train_dropout))
    assert recompute.replayable(graph, (False,)) == replayable
    assert not recompute.replayable(torch.fx.symbolic_trace(lambda x: x + torch.rand_like(x)), (False,))
    assert not recompute.replayable(torch.fx.symbolic_trace(_Noisy(False)), (True,))  # a module trains


def test_a_graph_that_writes_into_its_inputs_is_not_run_twice():
    """The second run would read what the first wrote; a write into a value of its own is harmless."""
    def writes_input(x):
        x.mul_(2)
        return x.tanh()

    def writes_own(x):
        y = x * 2
        y.add_(1)
        return y.tanh()

    assert not recompute.replayable(torch.fx.symbolic_trace(writes_input), (False,))
    assert recompute.replayable(torch.fx.symbolic_trace(writes_own), (False,))


class _StraightThroughRound(torch.autograd.Function):
    """Rounds, and passes the gradient through as if it had not (quantization-aware training's estimator)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _Quantized(torch.nn.Module):
    def __init__(self, own_gradient: bool):
        super().__init__()
        self.linear, self.own_gradient = torch.nn.Linear(4, 4), own_gradient

    def forward(self, x):
        y = self.linear(x) * 4
        return (_StraightThroughRound.apply(y) if self.own_gradient else torch.round(y)).tanh()


@pytest.mark.parametrize("own_gradient", [True, False])
def test_a_model_with_its_own_gradients_keeps_them(own_gradient):
    """Capture sees an autograd.Function's forward only: its graph's gradient would be round's (zero). A call that
    records gradients runs the model's own forward; near-miss twin: plain round, whose graph is the model."""
    model = _Quantized(own_gradient).eval()
    gm = fxbt.optimize(model, (torch.randn(2, 4),), inplace=False)
    spec, = fxbt.optimized.installed(gm).specializations
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x)) and spec.calls == 1  # no gradients: the graph serves
    got, = torch.autograd.grad(gm(x).sum(), model.linear.weight)
    with detached(model):
        want, = torch.autograd.grad(model(x).sum(), model.linear.weight)
    assert torch.equal(got, want) and bool(got.abs().sum() > 0) is own_gradient
    fell_back = fxbt.report(gm).original_calls
    assert spec.calls == (1 if own_gradient else 2)
    assert ["_StraightThroughRound" in why for why in fell_back] == ([True] if own_gradient else []), fell_back


class _OwnGelu(torch.autograd.Function):
    """GELU with a hand-written backward (BLOOM's GeLUFunction is one)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.gelu(x)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        return torch.func.grad(lambda v: F.gelu(v).sum())(x) * grad


def test_a_call_run_by_the_models_own_forward_returns_what_the_graph_returns():
    """A decoder with its own gradients: a call recording them runs the model's own forward, and returns what
    the graph returns (the zoo builds it with its cache off; with it on, its calls run through torch.compile)."""
    spec = zoo.SPECS["gpt2"]
    model = spec.build()
    for block in model.h:
        block.mlp.act = type("OwnGelu", (torch.nn.Module,), {"forward": lambda self, x: _OwnGelu.apply(x)})()
    gm = fxbt.optimize(model, spec.example(), inplace=False)
    probe = spec.probe()
    with torch.no_grad():
        served = gm(**probe)
    recorded = gm(**probe)
    assert fxbt.report(gm).original_calls, "the call with gradients should run the model's own forward"
    assert served.past_key_values is None and recorded.past_key_values is None
    real = probe["attention_mask"].bool()  # padded positions are the graph's zeros, the model's anything
    assert (served.last_hidden_state - recorded.last_hidden_state)[real].abs().max() < TOL
    assert recorded.last_hidden_state.requires_grad
