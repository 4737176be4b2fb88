"""torch.compile(model, backend="fxbt"): entry point, dynamic sizes, graph breaks, generation, inductor."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import fxbt
import zoo
from conftest import max_error, reference


def _compile(model, backend="fxbt"):
    torch._dynamo.reset()
    return torch.compile(model, backend=backend, dynamic=True)


def test_backend_is_listed_in_a_process_that_never_imported_fxbt():
    code = ("import sys, torch._dynamo; names = torch._dynamo.list_backends(); "
            "print('fxbt' in names, 'fxbt_inductor' in names, 'fxbt' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True", "False"]


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_compiled_model_matches_with_dynamic_sizes(name):
    from fxbt.backend import reports
    spec = zoo.SPECS[name]
    model = spec.build()
    compiled = _compile(model)
    before = len(reports())
    for batch, seq in [(2, 8), (3, 11), (1, 17)]:
        inputs = zoo.make_inputs(spec, batch, seq, pad=True, seed=seq)
        with torch.inference_mode():
            want, got = reference(model, inputs).last_hidden_state, compiled(**inputs).last_hidden_state
        real = inputs["attention_mask"][..., None]  # BERT's padded positions differ once blocks are fused
        assert ((want - got).abs() * real).max().item() < 1e-5
    new = reports()[before:]
    assert new and all(len(r.rewritten("sdpa")) == spec.attention_sites for r in new)


def test_graph_breaks_each_graph_is_rewritten():
    from fxbt.backend import reports
    from handwritten import BmmMaskedFill, inputs

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = BmmMaskedFill(), BmmMaskedFill()

        def forward(self, x, mask):
            h = self.a(x, mask)
            torch._dynamo.graph_break()
            return self.b(h, mask)

    model = Broken().eval()
    before = len(reports())
    x, mask = inputs(3, 9)
    with torch.inference_mode():  # each graph's stack is padding-free: zeros at padded positions
        assert ((model(x, mask) - _compile(model)(x, mask)).abs() * mask[..., None]).max().item() < 1e-5
    new = reports()[before:]
    assert len(new) == 2 and all(len(r.rewritten("sdpa")) == 1 for r in new)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_greedy_generation_matches_eager_with_every_step_rewritten(name, monkeypatch):
    from transformers import AutoModelForCausalLM
    from fxbt.backend import reports
    config = zoo.SPECS[name].build(use_cache=True).config
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    ids = torch.randint(3, zoo.VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = lm.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: calls.append((q.shape[-2], k.shape[-2])) or real_sdpa(q, k, v, **kw))
    before = len(reports())
    torch._dynamo.reset()
    lm.forward = torch.compile(lm.forward, backend="fxbt", dynamic=True)
    with torch.no_grad():
        got = lm.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(want, got)
    assert all(len(r.rewritten("sdpa")) == config.num_hidden_layers for r in reports()[before:])
    # eager attention never calls SDPA: every call is a rewritten region. One prefill of 6 tokens, then
    # query length 1 against a cache growing to 13, in every layer; and verification of each graph's regions.
    assert (6, 6) in calls and (1, 13) in calls
    graphs = len(reports()[before:])
    assert len(calls) == (8 + graphs) * config.num_hidden_layers


@pytest.mark.slow
def test_fxbt_composes_with_inductor():
    from handwritten import EinsumFusedQKV, inputs
    from fxbt.backend import reports
    model = EinsumFusedQKV().eval()
    x, mask = inputs(3, 9)
    before = len(reports())
    with torch.inference_mode():
        got = _compile(model, "fxbt_inductor")(x, mask)
        assert max_error(model(x, mask), got) < 1e-5
    assert len(reports()[before:][0].rewritten("sdpa")) == 1


def test_compiled_bert_in_eval_mode_removes_padding_and_default_sdpa_models_are_rewritten():
    """dynamo hands the graph over as a training-mode GraphModule; the graph's own dropout says what was
    traced, so the encoder stack of a model in eval mode runs padding-free. transformers' default SDPA attention
    (its scale computed from q.size(-1)) is recognised too."""
    from fxbt.backend import reports
    spec = zoo.SPECS["bert"]
    for attn in ("eager", "sdpa"):
        model = spec.build(attn=attn)
        compiled = _compile(model)
        before = len(reports())
        inputs = zoo.make_inputs(spec, 3, 11, pad=True, seed=4)
        with torch.no_grad():
            want, got = reference(model, inputs).last_hidden_state, compiled(**inputs).last_hidden_state
        real = inputs["attention_mask"][..., None]
        assert ((want - got).abs() * real).max().item() < 1e-5
        new = reports()[before:]
        stacks = [r for report in new for r in report.rewritten("padding_free")]
        assert len(stacks) == 1 and f"{zoo.L} attentions" in stacks[0].reason and stacks[0].calls.get("fast"), \
            [(r.reason, r.calls) for r in stacks]


class PoolsAfterABreak(nn.Module):
    """A masked stack, a branch on values (dynamo breaks the graph there), then a mean over every position, padded
    ones included: the code after the break reads what the stack computes at padded positions."""

    def __init__(self):
        super().__init__()
        from handwritten import BmmMaskedFill, Residual
        self.stack = Residual(BmmMaskedFill)

    def forward(self, x, mask):
        h = self.stack(x, mask)
        if mask.sum() > 0:
            h = h * 2
        return h.mean(dim=1)


class BreaksBeforeTheStack(PoolsAfterABreak):
    """Near-miss twin: the break comes first, and the stack's graph returns what the model returns."""

    def forward(self, x, mask):
        if mask.sum() > 0:
            x = x * 2
        return self.stack(x, mask)


@pytest.mark.parametrize("route", ["torch.compile", "fxbt.optimize"])
def test_a_graph_whose_outputs_code_after_a_break_reads_keeps_its_padded_positions(route):
    """Zeros at padded positions are right for a model's outputs, not for values the rest of its code reads."""
    from fxbt.backend import reports
    from handwritten import inputs
    torch.manual_seed(0)
    x, mask = inputs(3, 9)
    probe, probe_mask = inputs(4, 11, seed=3)
    for model_class, pooled in ((PoolsAfterABreak, True), (BreaksBeforeTheStack, False)):
        model = model_class().eval()
        before = len(reports())
        if route == "torch.compile":
            run = _compile(model)
            with torch.no_grad():
                run(x, mask)
            new = reports()[before:]
        else:
            run = fxbt.optimize(model, (x, mask), inplace=False)
            new = fxbt.report(run).compiled
        with torch.no_grad():
            want, got = model(probe, probe_mask), run(probe, probe_mask)
        real = torch.ones_like(want) if pooled else probe_mask[..., None]
        assert ((want - got).abs() * real).max().item() < 1e-5, model_class.__name__
        stacks = [r for report in new for r in report.rewritten("padding_free")]
        declined = [r.reason for report in new for r in report.rejected("padding_free")]
        if pooled:
            assert not stacks and any("code reads after the graph" in r for r in declined), declined
        else:
            assert len(stacks) == 1 and "2 attentions" in stacks[0].reason, [r.reason for r in stacks]
