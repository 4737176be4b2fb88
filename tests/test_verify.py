"""optimize(verify=True): a region that disagrees with its original on the example is reverted, reported."""
from __future__ import annotations

import torch
import torch.nn as nn

import fxbt
import zoo
from conftest import reference


def test_a_wrong_rewrite_is_reverted_and_reported():
    wrong = fxbt.Rule("almost_relu", lambda x: torch.relu(x) * 2, lambda x: torch.relu(x) * 2.001)

    class M(nn.Module):
        def forward(self, x):
            return torch.relu(x) * 2 + 1

    model, x = M(), torch.rand(4, 8) + 0.5
    checked = fxbt.optimize(model, (x,), patterns=[wrong], inplace=False)
    row = fxbt.report(checked).rows[0]
    assert row.status == "rejected" and row.reason.startswith("verification: outputs differ by")
    assert not fxbt.region.regions(checked) or all(
        n.op != "call_module" for n in fxbt.api.graph_module(checked).graph.nodes if "fxbt_region" in str(n.target))
    assert torch.equal(checked(x), model(x))
    unchecked = fxbt.optimize(model, (x,), patterns=[wrong], verify=False, inplace=False)
    assert fxbt.report(unchecked).rows[0].status == "rewritten"
    assert not torch.equal(unchecked(x), model(x))
    assert torch.equal(fxbt.unroll(checked)(x), model(x))


def test_correct_rewrites_all_pass_verification():
    spec = zoo.SPECS["bert"]
    model = spec.build()
    gm = fxbt.optimize(model, spec.example(), verify=True, inplace=False)
    report = fxbt.report(gm)
    assert not report.rejected() and len(report.rewritten("sdpa")) == zoo.L and len(report.rewritten()) == zoo.L + 1
    probe = spec.probe()
    with torch.inference_mode():
        want, got = reference(model, probe), gm(**probe)
    assert ((want.last_hidden_state - got.last_hidden_state).abs() * probe["attention_mask"][..., None]).max() < 1e-5
