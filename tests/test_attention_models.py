"""Every attention site of each architecture is rewritten to SDPA, outputs match, unroll is exact."""
from __future__ import annotations

import pytest
import torch
import transformers

import fxbt
import zoo
from conftest import identical, max_error, reference

TOL = 1e-5


ATTENTION_ONLY = ["softmax_attention", "existing_sdpa"]  # encoder fusion is tested in test_encoder.py
MODELS = [name for name, spec in zoo.SPECS.items() if spec.attention_sites and name not in zoo.ENCODER_ONLY]


@pytest.fixture(scope="module", params=sorted(MODELS))
def optimized(request):
    spec = zoo.SPECS[request.param]
    model = spec.build()
    return spec, model, fxbt.optimize(model, spec.example(), patterns=ATTENTION_ONLY)


def test_every_attention_site_is_rewritten(optimized, record_model_row):
    spec, model, gm = optimized
    report = fxbt.report(gm)
    rewritten = report.rewritten("sdpa")
    assert len(rewritten) == spec.attention_sites, str(report)
    assert not report.rejected("sdpa"), str(report)
    probe = spec.probe()
    with torch.no_grad():  # with gradients on, a model with its own autograd.Function (BLOOM's GELU) runs itself
        err = max_error(reference(model, probe), gm(**probe))
    assert not fxbt.report(gm).original_calls, "the graph should serve the call measured"
    assert err < TOL, f"{spec.name}: max abs error {err:.2e}"
    record_model_row({"model": spec.name, "transformers": transformers.__version__, "frontend": report.frontend,
                      "sdpa": len(rewritten), "sites": spec.attention_sites, "max_err": err,
                      "causal": sum(r.reason.startswith("is_causal") for r in rewritten)})


def test_drop_in_output_type_and_shapes(optimized):
    spec, model, gm = optimized
    for batch, seq in [(1, 5), (4, 13)]:
        inputs = zoo.make_inputs(spec, batch, seq, pad=True, seed=3)
        with torch.no_grad():
            want, got = reference(model, inputs), gm(**inputs)
        assert type(got) is type(want)
        assert max_error(want, got) < TOL
    assert not fxbt.report(gm).original_calls, "the graph should serve the calls measured"


def test_unroll_is_the_captured_graph(optimized):
    spec, model, gm = optimized
    captured = fxbt.capture(model, spec.example()).gm
    unrolled = fxbt.unroll(gm)
    assert _ops(unrolled) == _ops(captured)
    probe = spec.probe()
    with torch.no_grad():
        assert identical(unrolled(**probe), reference(model, probe))


def _ops(gm):
    return [(n.op, str(n.target), n.name) for n in gm.graph.nodes]
