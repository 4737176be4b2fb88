"""Capture: the frontends, their order, their failures, and inputs fxbt cannot use."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxbt
import zoo
from conftest import reference
from test_encoder import real_token_error


class DataDependentBranch(nn.Module):
    """Python control flow on a tensor's value: no frontend can capture one graph for it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return -x


def test_data_dependent_control_flow_names_every_frontend():
    with pytest.raises(fxbt.CaptureError) as info:
        fxbt.optimize(DataDependentBranch(), (torch.randn(2, 8),))
    reasons = info.value.reasons
    assert set(reasons) == {"hf_fx", "dynamo", "fx"}
    assert "PreTrainedModel" in reasons["hf_fx"] or "removed" in reasons["hf_fx"]
    assert "control flow" in reasons["fx"] or "TraceError" in reasons["fx"]
    assert "dynamo" in str(info.value) and isinstance(info.value, fxbt.FxbtError)


def test_report_names_the_frontend_and_earlier_failures():
    spec = zoo.SPECS["bert"]
    gm = fxbt.optimize(spec.build(), spec.example())
    report = fxbt.report(gm)
    expected = "hf_fx" if zoo.transformers_major() == 4 else "dynamo"
    assert report.frontend == expected
    assert all(row.frontend == expected for row in report.rows)
    if expected == "dynamo":
        assert "hf_fx" in report.failures
    text = str(report)
    assert f"captured with {expected}" in text and "rewritten" in text and "region" in text


@pytest.mark.skipif(zoo.transformers_major() != 4, reason="the HF fx tracer exists in transformers 4.x only")
@pytest.mark.parametrize("model_type", ["xlm-roberta", "camembert", "data2vec-text", "ernie"])
def test_hf_tracer_is_driven_past_its_whitelist(model_type):
    spec = zoo.Spec(model_type, model_type, dict(zoo._BERTISH, pad_token_id=1), "text", zoo.L)
    model = spec.build()
    gm = fxbt.optimize(model, spec.example(), inplace=False)
    assert fxbt.report(gm).frontend == "hf_fx"
    probe = spec.probe()
    assert real_token_error(spec, reference(model, probe), gm(**probe), probe) < 1e-5


def test_each_frontend_can_be_forced():
    from handwritten import BmmMaskedFill, inputs
    model = BmmMaskedFill().eval()
    for frontend in ("dynamo", "fx"):
        assert fxbt.report(fxbt.optimize(model, inputs(), frontend=frontend)).frontend == frontend
    with pytest.raises(fxbt.InputError, match="unknown frontend"):
        fxbt.optimize(model, inputs(), frontend="onnx")


@pytest.mark.parametrize("bad, message", [
    ("not a tensor", "tuple of positional inputs or a dict"),
    ((1, 2), "no tensor"),
    ({"x": torch.randn(2, 7, 32), "nonsense": 3}, "do not fit"),
])
def test_bad_example_inputs_raise_input_error(bad, message):
    from handwritten import BmmMaskedFill
    with pytest.raises(fxbt.InputError, match=message):
        fxbt.optimize(BmmMaskedFill(), bad)


def test_graph_that_does_not_reproduce_the_model_is_refused():
    """A frontend whose graph computes something else is a failed frontend, not a silent wrong answer."""
    class Stateful(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return x * self.calls

    with pytest.raises(fxbt.CaptureError, match="does not reproduce"):
        fxbt.optimize(Stateful(), (torch.ones(2, 3),), frontend="fx")
