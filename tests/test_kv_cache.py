"""A decoder called plainly, its config's cache on, returns its KV cache, and a caller may feed that cache back
for the next token. fxbt's graphs are captured with the cache off, so they would return none: such calls run
through torch.compile with the fxbt backend, which returns the model's cache. The same call with
``use_cache=False`` keeps fxbt's own graph, and so does an encoder whose config caches but whose forward never
returns a cache.
"""
from __future__ import annotations

import pytest
import torch

import fxbt
import zoo
from test_encoder import real_token_error

TOL = 1e-5


def _prompt_and_step(spec):
    prompt = zoo.make_inputs(spec, 3, 9, True, seed=2, left=True)
    token = torch.randint(3, zoo.VOCAB, (3, 1), generator=torch.Generator().manual_seed(3))
    mask = torch.cat([prompt["attention_mask"], torch.ones(3, 1, dtype=torch.long)], dim=1)
    return prompt, {"input_ids": token, "attention_mask": mask}


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_plain_decoder_call_returns_a_cache_that_continues_as_the_models(name):
    spec = zoo.SPECS[name]
    model = spec.build(use_cache=True)
    optimized = fxbt.optimize(model, zoo.make_inputs(spec, 2, 8, True, seed=1, left=True), inplace=False)
    prompt, step = _prompt_and_step(spec)
    with torch.no_grad():
        want, got = model(**prompt), optimized(**prompt)
        assert got.past_key_values is not None, "the model returns its cache; the optimized model must too"
        assert real_token_error(spec, want.last_hidden_state, got.last_hidden_state, prompt) < TOL
        # the next token, from each cache, by the model itself: a cache is used once (the step appends to it)
        after_want = model(**step, past_key_values=want.past_key_values).last_hidden_state
        after_got = model(**step, past_key_values=got.past_key_values).last_hidden_state
    assert (after_want - after_got).abs().max() < TOL
    report = fxbt.report(optimized)
    assert report.compiled and not report.reports
    assert any("returns a KV cache" in h for h in report.history)


def test_the_same_call_without_its_cache_keeps_fxbts_graph():
    spec = zoo.SPECS["llama"]
    model = spec.build(use_cache=True)
    prompt, _ = _prompt_and_step(spec)
    optimized = fxbt.optimize(model, dict(prompt, use_cache=False), inplace=False)
    with torch.no_grad():
        got = optimized(**prompt, use_cache=False)
        want = model(**prompt, use_cache=False)
    assert got.past_key_values is None and want.past_key_values is None
    assert real_token_error(spec, want, got, prompt) < TOL
    report = fxbt.report(optimized)
    assert report.reports and not report.compiled
    assert report.rewritten("padding_free")


def test_an_encoder_whose_config_caches_keeps_its_graph():
    spec = zoo.SPECS["bert"]
    model = spec.build(use_cache=True)  # BertConfig's default; BertModel returns a cache only as a decoder
    assert model.config.use_cache
    optimized = fxbt.optimize(model, spec.example(), inplace=False)
    probe = spec.probe()
    with torch.no_grad():
        got, want = optimized(**probe), model(**probe)
    assert real_token_error(spec, want, got, probe) < TOL
    report = fxbt.report(optimized)
    assert report.reports and not report.compiled
    assert report.rewritten("padding_free")


def test_every_model_of_a_class_gets_its_compiled_calls():
    """Dynamo keeps compiled code, and at most ``recompile_limit`` (8) recompilations, per code object, and models
    of one class share their forward's: without a code object per optimized model, the ninth model's calls ran
    uncompiled, silently."""
    spec = zoo.SPECS["llama"]
    prompt, _ = _prompt_and_step(spec)
    for seed in range(torch._dynamo.config.recompile_limit + 1):
        torch.manual_seed(seed)
        model = spec.build(use_cache=True, num_hidden_layers=1)
        optimized = fxbt.optimize(model, inplace=False)
        with torch.no_grad():
            assert optimized(**prompt).past_key_values is not None
        assert fxbt.report(optimized).compiled, f"model {seed}: no call ran a compiled graph"
