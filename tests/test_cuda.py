"""On a CUDA device (skipped without one; CI has none): padding-free stacks and encoder blocks on the GPU.

fp32 runs must match the model's own outputs on real tokens as on the CPU; fp16 runs must be no further from the
model's fp32 outputs than the model's own fp16 forward is (twice that, plus fp16 rounding at the outputs' scale).
Where no mask is left among the real tokens (key padding, causal with left padding), each attention must have run
as one call: variable-length flash attention in fp16, the sequences padded to the longest in fp32.
"""
from __future__ import annotations

import pytest
import torch

import fxbt
import zoo
from conftest import reference
from fxbt import varlen
from test_encoder import real_token_error
from test_padding_free import PASS, _padding_free

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# key padding, causal with left padding, causal with right padding: no mask is left among the real tokens
STACKS = [("bert", "sdpa", False), ("llama", "sdpa", True), ("gpt2", "sdpa", True), ("opt", "eager", False),
          ("distilbert", "eager", True)]


def _on_cuda(batch: dict) -> dict:
    return {k: v.cuda() for k, v in batch.items()}


def _count(monkeypatch, name: str) -> list:
    calls, original = [], getattr(varlen, name)

    def counted(*args, **kwargs):
        calls.append(args[1].dtype)
        return original(*args, **kwargs)

    monkeypatch.setattr(varlen, name, counted)
    return calls


@pytest.fixture
def varlen_calls(monkeypatch):
    return _count(monkeypatch, "attention")


@pytest.fixture
def padded_calls(monkeypatch):
    return _count(monkeypatch, "padded_attention")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name,attn,left", STACKS)
def test_stacks_run_padding_free_on_cuda(name, attn, left, dtype, varlen_calls, padded_calls):
    spec = zoo.SPECS[name]
    model32 = spec.build(attn).cuda()
    model = spec.build(attn).cuda().to(dtype)
    opt = fxbt.optimize(model, _on_cuda(zoo.make_inputs(spec, 3, 9, True, seed=1, left=left)), inplace=False,
                        patterns=PASS)
    assert len(fxbt.report(opt).rewritten("padding_free")) == 1, str(fxbt.report(opt))
    probe = _on_cuda(zoo.make_inputs(spec, 4, 12, True, seed=4, left=left))
    opt(**probe)  # a graph for the probe's sizes, where the example's were pinned: verified on this call
    varlen_calls.clear()
    padded_calls.clear()
    got = opt(**probe)
    assert [r.last_path for r in _padding_free(opt)] == ["replacement"]
    if dtype == torch.float32:
        assert real_token_error(spec, reference(model, probe), got, probe) < 1e-5
        assert not varlen_calls and len(padded_calls) == zoo.L  # flash attention has no fp32: one padded call
        return
    want = reference(model32, probe)
    own = real_token_error(spec, want, reference(model, probe), probe)
    assert real_token_error(spec, want, got, probe) <= 2 * own + 2e-3
    assert len(varlen_calls) == zoo.L, "every attention of the stack in one varlen call"


def test_an_attention_whose_mask_remains_among_real_tokens_runs_per_sequence(varlen_calls):
    """BLOOM's ALiBi bias varies within the real tokens: its attentions keep their masks, one SDPA call per
    sequence (the near miss of the varlen path)."""
    spec = zoo.SPECS["bloom"]
    model32 = spec.build("eager").cuda()
    model = spec.build("eager").cuda().half()
    opt = fxbt.optimize(model, _on_cuda(zoo.make_inputs(spec, 3, 9, True, seed=1, left=True)), inplace=False,
                        patterns=PASS)
    probe = _on_cuda(zoo.make_inputs(spec, 4, 12, True, seed=4, left=True))
    varlen_calls.clear()
    got = opt(**probe)
    assert [r.last_path for r in _padding_free(opt)] == ["replacement"] and not varlen_calls
    want = reference(model32, probe)
    assert real_token_error(spec, want, got, probe) <= 2 * real_token_error(spec, want, reference(model, probe),
                                                                            probe) + 2e-3


def test_encoder_blocks_on_cuda():
    spec = zoo.SPECS["bert"]
    model = spec.build("sdpa").cuda()
    opt = fxbt.optimize(model, _on_cuda(zoo.make_inputs(spec, 3, 9, True, seed=1)), inplace=False,
                        encoder_impl="fused")
    probe = _on_cuda(zoo.make_inputs(spec, 4, 12, True, seed=4))
    with torch.inference_mode():
        got = opt(**probe)
    assert real_token_error(spec, reference(model, probe), got, probe) < 1e-5
    rows = fxbt.report(opt).reports[0].rewritten("fused_encoder")  # the graph of the call just made
    assert rows and all(r.impl == "fused" for r in rows), str(fxbt.report(opt))
    assert all(r.calls.get("fast", 0) >= 1 for r in rows), [dict(r.calls) for r in rows]


def test_auto_leaves_encoder_stacks_to_the_padding_free_pass_on_cuda():
    """Measured faster on CUDA than the fused kernel (bench/gpu.py): the block template runs only when asked."""
    spec = zoo.SPECS["bert"]
    opt = fxbt.optimize(spec.build("sdpa").cuda(), _on_cuda(zoo.make_inputs(spec, 3, 9, True, seed=1)),
                        inplace=False)
    report = fxbt.report(opt)
    assert len(report.rewritten("padding_free")) == 1, str(report)
    assert not [r for r in report.rows if r.kernel == "fused_encoder"], str(report)


def test_training_step_on_cuda_attends_in_one_padded_call_with_the_models_gradients(padded_calls):
    """Dropout rules flash attention's varlen out: one padded SDPA call per attention, gradients as the model's
    with dropout off."""
    from test_padding_free import _gradient_error

    spec = zoo.SPECS["bert"]
    model = spec.build("sdpa", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).cuda().train()
    opt = fxbt.optimize(model, _on_cuda(spec.example()), inplace=False, patterns=PASS)
    probe = _on_cuda(spec.probe())
    opt(**probe)  # a graph for the probe's sizes, where the example's were pinned: verified on this call
    padded_calls.clear()
    assert _gradient_error(model, opt, probe) < 1e-5
    assert [r.last_path for r in _padding_free(opt)] == ["replacement"] and len(padded_calls) == zoo.L


@pytest.mark.parametrize("name,left", [("bert", False), ("llama", True)])
def test_a_model_optimized_on_the_cpu_then_moved_to_cuda_runs_there(name, left):
    """The CPU graph's constants and tokens bookkeeping must not leak into a call on CUDA: the call gets a graph
    of its own, outputs as the model's."""
    spec = zoo.SPECS[name]
    twin = spec.build("sdpa")
    model = fxbt.optimize(spec.build("sdpa"), zoo.make_inputs(spec, 3, 9, True, seed=1, left=left))
    model.cuda()
    probe = zoo.make_inputs(spec, 4, 12, True, seed=4, left=left)
    got = model(**_on_cuda(probe))
    assert got[0].is_cuda
    want = reference(twin, probe)
    assert real_token_error(spec, want, type(want)({k: v.cpu() for k, v in got.items()}), probe) < 1e-5
