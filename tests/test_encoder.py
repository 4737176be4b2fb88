"""Encoder blocks become the fused encoder, with padding removed once across the whole stack.

The template is opt-in (``encoder_impl="fused"``); by default the padding-free pass takes encoder stacks."""
from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

import fxbt
import handwritten
import zoo
from conftest import reference
from fxbt.patterns import encoder
from fxbt.optimized import detached
from fxbt.region import regions

TOL = 1e-5


def real_token_error(spec, want, got, inputs) -> float:
    """Max abs error over real tokens of every output (padded positions may differ by design)."""
    worst = 0.0
    mask = inputs.get("attention_mask")
    for a, b in zip(pytree.tree_leaves(want), pytree.tree_leaves(got)):
        assert isinstance(b, torch.Tensor) and not b.is_nested and a.shape == b.shape
        diff = (a.float() - b.float()).abs()
        if mask is not None and diff.dim() == 3 and diff.shape[:2] == mask.shape:
            diff = diff * mask[..., None]
        worst = max(worst, diff.max().item())
    return worst


def _fused_regions(gm):
    return [r for _, r in regions(gm) if r.kernel == "fused_encoder"]


@pytest.mark.parametrize("name", sorted(zoo.ENCODERS))
def test_every_encoder_block_is_fused_and_real_tokens_match(name):
    overrides, blocks = zoo.ENCODERS[name]
    spec = zoo.SPECS[name]
    model = spec.build(**overrides)
    gm = fxbt.optimize(model, spec.example(), encoder_impl="fused")
    report = fxbt.report(gm)
    assert len(report.rewritten("fused_encoder")) == blocks, str(report)
    assert all(r.impl == "fused" for r in report.rewritten("fused_encoder"))
    for batch, seq in [(3, 11), (1, 6), (4, 9)]:
        inputs = zoo.make_inputs(spec, batch, seq, pad=True, seed=batch)
        with torch.no_grad():
            err = real_token_error(spec, reference(model, inputs), gm(**inputs), inputs)
        assert err < TOL, f"{name}: {err:.2e}"
        assert all(r.last_path == "replacement" for r in _fused_regions(gm))


@pytest.mark.parametrize("name", sorted(zoo.ENCODER_DECLINED))
def test_blocks_with_another_activation_are_declined_and_attention_still_sdpa(name):
    overrides, reason = zoo.ENCODER_DECLINED[name]
    spec = zoo.SPECS[name]
    gm = fxbt.optimize(spec.build(**overrides), spec.example(), encoder_impl="fused")
    report = fxbt.report(gm)
    assert not report.rewritten("fused_encoder")
    declined = report.rejected("fused_encoder")
    assert len(declined) == zoo.L and all(reason in r.reason for r in declined), str(report)
    assert len(report.rewritten("sdpa")) == spec.attention_sites


@pytest.fixture(scope="module")
def bert():
    spec = zoo.SPECS["bert"]
    model = spec.build(num_hidden_layers=3)
    return spec, model


def test_padding_is_removed_once_per_stack(bert, monkeypatch):
    spec, model = bert
    gm = fxbt.optimize(model, spec.example(), encoder_impl="fused")
    blocks = _fused_regions(gm)
    assert [r.params.get("emit_packed", False) for r in blocks] == [True, True, False]
    calls = []
    real_pack = encoder.pack
    monkeypatch.setattr(encoder, "pack", lambda *a: calls.append(1) or real_pack(*a))
    inputs = spec.probe()
    with torch.no_grad():
        out = gm(**inputs)
    assert len(calls) == 1
    assert out.last_hidden_state.shape == reference(model, inputs).last_hidden_state.shape


@pytest.mark.parametrize("side", ["right", "left"])
def test_left_and_right_padding_and_an_empty_row(bert, side):
    spec, model = bert
    gm = fxbt.optimize(model, spec.example(), encoder_impl="fused")
    inputs = zoo.make_inputs(spec, 4, 10, pad=True, seed=7, left=side == "left")
    inputs["attention_mask"][2] = 0  # a row with no real token at all
    with torch.no_grad():
        want, got = reference(model, inputs), gm(**inputs)
    assert not torch.isnan(got.last_hidden_state).any()
    rows = [0, 1, 3]
    mask = inputs["attention_mask"][rows, :, None]
    err = ((want.last_hidden_state[rows] - got.last_hidden_state[rows]).abs() * mask).max().item()
    assert err < TOL


def test_by_default_encoder_stacks_are_left_to_the_padding_free_pass(bert):
    """The template is opt-in: without encoder_impl="fused" no block is fused, and the whole stack runs on its
    real tokens through the padding-free pass instead."""
    spec, model = bert
    gm = fxbt.optimize(model, spec.example(), inplace=False)
    report = fxbt.report(gm)
    assert not [r for r in report.rows if r.kernel == "fused_encoder"], str(report)
    rows = report.rewritten("padding_free")
    assert len(rows) == 1 and "3 attentions" in rows[0].reason, str(report)
    with torch.no_grad():
        assert real_token_error(spec, reference(model, spec.probe()), gm(**spec.probe()), spec.probe()) < TOL
    with pytest.raises(fxbt.InputError, match="'dense' was removed"):
        fxbt.optimize(model, spec.example(), encoder_impl="dense", inplace=False)


def test_hidden_states_requested_end_the_stack_and_are_plain_tensors(bert):
    spec, _ = bert
    model = spec.build(num_hidden_layers=3)  # its own: transformers 5 leaves its recording hooks on the layers
    inputs = dict(spec.example(), output_hidden_states=True)
    gm = fxbt.optimize(model, inputs, encoder_impl="fused")
    blocks = _fused_regions(gm)
    assert len(blocks) == 3 and not any(r.params.get("emit_packed") for r in blocks)
    probe = dict(spec.probe(), output_hidden_states=True)
    with torch.no_grad():
        got = gm(**probe)
        want = reference(model, probe)
    assert len(got.hidden_states) == 4
    assert real_token_error(spec, want.hidden_states, got.hidden_states, probe) < TOL
    # transformers 5 records hidden states with forward hooks it leaves on the layers: later kinds of call
    # still get graphs of their own (dynamo traces the hooks), their blocks fused
    plain = spec.probe()
    with torch.no_grad():
        assert real_token_error(spec, reference(model, plain), gm(**plain), plain) < TOL
    report = fxbt.report(gm)
    assert len(report.reports) == 2 and not report.compiled
    assert len(report.reports[0].rewritten("fused_encoder")) == 3


def test_attention_probabilities_requested_leave_blocks_unfused(bert):
    spec, _ = bert
    model = spec.build(num_hidden_layers=3)  # its own: transformers 5 leaves its recording hooks on the layers
    gm = fxbt.optimize(model, dict(spec.example(), output_attentions=True))
    report = fxbt.report(gm)
    assert not report.rewritten() and report.rejected("sdpa")
    assert all("probabilities" in r.reason for r in report.rejected("sdpa"))


def _real_token_loss(out, mask):
    weights = torch.randn(out.last_hidden_state.shape, generator=torch.Generator().manual_seed(0))
    return (out.last_hidden_state * weights * mask[..., None]).sum()


def test_with_gradients_the_fused_kernel_serves_the_forward_and_gradients_match(bert):
    """Gradients enabled in eval mode (no torch.no_grad()): the call runs without recording (fxbt/recompute.py),
    so the fused kernel serves it. The backward runs the graph again with gradients: the kernel has no autograd
    and leaves that run to the original. Gradients are exact."""
    spec, model = bert
    gm = fxbt.optimize(model, spec.example(), encoder_impl="fused", inplace=False)
    inputs = spec.probe()
    embeds = model.embeddings.word_embeddings(inputs["input_ids"]).detach().requires_grad_()
    call = {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]}
    got = gm(**call)
    assert all(r.last_path == "replacement" for r in _fused_regions(gm)), [r.last_path for r in _fused_regions(gm)]
    got_grads = torch.autograd.grad(_real_token_loss(got, inputs["attention_mask"]),
                                    [embeds] + list(model.parameters()), allow_unused=True)
    in_backward = "gradients needed: the fused kernel has no autograd"
    assert all(r.last_path.startswith(in_backward) for r in _fused_regions(gm)), [r.last_path for r in _fused_regions(gm)]
    with detached(model):
        want = model(**call)
    want_grads = torch.autograd.grad(_real_token_loss(want, inputs["attention_mask"]),
                                     [embeds] + list(model.parameters()), allow_unused=True)
    assert real_token_error(spec, want, got, inputs) < TOL
    assert got_grads[0].abs().sum() > 0  # the input's gradient flows (it was silently zero on the fused kernel)
    for g, w in zip(got_grads, want_grads):  # within 1e-5 of the largest gradient entry
        assert (g is None) == (w is None) and (g is None or (g - w).abs().max().item() <= TOL * max(1.0, w.abs().max()))


def test_training_mode_gets_a_graph_of_its_own_where_blocks_are_not_fused(bert):
    spec, model = bert
    gm = fxbt.optimize(model, spec.example(), inplace=False, encoder_impl="fused")
    gm.train()
    with torch.no_grad():
        gm(**spec.probe())
    report = fxbt.report(gm)
    assert "training mode switched" in report.history[-1]
    training_graph = report.reports[0]
    assert training_graph.rewritten("sdpa") and not training_graph.rewritten("fused_encoder")
    assert all("training mode" in r.reason for r in training_graph.rejected("fused_encoder"))
    gm.eval()


def test_qkv_weights_are_packed_without_a_copy_and_unroll_stays_exact(bert):
    spec, model = bert
    before = sum(p.numel() for p in model.parameters())
    gm = fxbt.optimize(model, spec.example(), encoder_impl="fused")
    with torch.no_grad():
        gm(**spec.probe())
    block = _fused_regions(gm)[0]
    packed = block.params["pack_qkv"].weight
    query = model.encoder.layer[0].attention.self.query.weight
    assert query.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr()
    assert sum(p.numel() for p in model.parameters()) == before
    with torch.no_grad():
        assert torch.equal(fxbt.unroll(gm)(**spec.probe()).last_hidden_state,
                           reference(model, spec.probe()).last_hidden_state)


def test_blocks_of_a_model_already_on_sdpa_are_fused():
    """transformers' default SDPA attention is recognised as attention, so its blocks fuse too."""
    spec = zoo.SPECS["bert"]
    model = spec.build(attn="sdpa")
    gm = fxbt.optimize(model, spec.example(), encoder_impl="fused")
    report = fxbt.report(gm)
    assert all(r.reason == "already SDPA" for r in report.rewritten("sdpa")) and report.rewritten("sdpa")
    assert len(report.rewritten("fused_encoder")) == zoo.L
    with torch.no_grad():
        assert real_token_error(spec, reference(model, spec.probe()), gm(**spec.probe()), spec.probe()) < TOL


def test_a_block_with_another_attention_scale_is_declined():
    import torch.nn as nn
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(32, 32) for _ in range(4))
            self.ln1, self.ln2 = nn.LayerNorm(32), nn.LayerNorm(32)
            self.ff1, self.ff2 = nn.Linear(32, 64), nn.Linear(64, 32)
            self.scale = scale

        def forward(self, x):
            b, s, _ = x.shape
            q, k, v = (f(x).view(b, s, 4, 8).transpose(1, 2) for f in (self.q, self.k, self.v))
            a = torch.softmax(q @ k.transpose(-1, -2) * self.scale, -1) @ v
            h = self.ln1(x + self.o(a.transpose(1, 2).reshape(b, s, 32)))
            return self.ln2(h + self.ff2(F.relu(self.ff1(h))))

    x = torch.randn(2, 5, 32)
    fused = fxbt.report(fxbt.optimize(Block(8 ** -0.5).eval(), (x,), encoder_impl="fused"))
    assert len(fused.rewritten("fused_encoder")) == 1, str(fused)
    other = fxbt.report(fxbt.optimize(Block(0.2).eval(), (x,), encoder_impl="fused"))
    assert not other.rewritten("fused_encoder")
    assert "not 1/sqrt(head size)" in other.rejected("fused_encoder")[0].reason
    assert len(other.rewritten("sdpa")) == 1


def _handwritten_stack(block, frontend, **options):
    """A 3-block stack of a hand-written ``block`` and its optimized graph (example: batch 3, sequence 8)."""
    torch.manual_seed(0)
    model = handwritten.Stack(block).eval()
    options.setdefault("encoder_impl", "fused")
    return model, fxbt.optimize(model, handwritten.inputs(batch=3, seq=8), frontend=frontend, inplace=False,
                                **options)


def _error_on_other_sizes(model, gm) -> float:
    x, mask = handwritten.inputs(batch=2, seq=11, seed=1)
    with torch.inference_mode():
        return (((gm(x, mask) - model(x, mask)).abs() * mask[..., None]).max()).item()


def _fused_encoder_reasons(gm) -> set:
    return {r.reason for r in fxbt.report(gm).rows if r.kernel == "fused_encoder"}


@pytest.mark.parametrize("frontend", ["fx", "dynamo"])
@pytest.mark.parametrize("scale_from", ["head_dim", "q_size", "sdpa"])
def test_a_scale_computed_from_sizes_the_weights_fix_is_fused(scale_from, frontend):
    model, gm = _handwritten_stack(lambda: handwritten.SizeScaledBlock(scale_from), frontend)
    assert len(_fused_regions(gm)) == 3, fxbt.report(gm)
    assert _error_on_other_sizes(model, gm) < TOL


@pytest.mark.parametrize("frontend", ["fx", "dynamo"])
def test_a_scale_computed_from_the_sequence_length_is_not_fused(frontend):
    model, gm = _handwritten_stack(lambda: handwritten.SizeScaledBlock("seq_len"), frontend)
    assert not _fused_regions(gm)
    assert _fused_encoder_reasons(gm) == {"attention scale is computed at run time from sizes that can change"}
    assert _error_on_other_sizes(model, gm) < TOL


# plain fx cannot unpack a Proxy (``q, k, v = qkv.unbind(0)``): those styles are captured by dynamo
@pytest.mark.parametrize("split, frontend", [("index", "fx"), ("index", "dynamo"), ("unbind", "dynamo"),
                                             ("chunk", "dynamo")])
def test_q_k_v_from_one_projection_are_fused(split, frontend):
    model, gm = _handwritten_stack(lambda: handwritten.PackedQKVBlock(split), frontend, encoder_impl="fused")
    assert len(_fused_regions(gm)) == 3, fxbt.report(gm)
    assert _error_on_other_sizes(model, gm) < TOL


def test_q_k_v_packed_per_head_are_declined_with_the_reason():
    model, gm = _handwritten_stack(lambda: handwritten.PackedQKVBlock("per_head"), "dynamo")
    assert not _fused_regions(gm)
    reasons = _fused_encoder_reasons(gm)
    assert reasons and all("packed in one projection in another order" in r for r in reasons), reasons
    assert _error_on_other_sizes(model, gm) < TOL
