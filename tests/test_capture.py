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


def test_data_dependent_control_flow_runs_through_torch_compile_and_says_why():
    """No frontend captures one graph for a branch on values: torch.compile breaks the graph there, its guards
    pick the branch per call, and the report names every frontend's failure and the line that blocks them."""
    model = DataDependentBranch().eval()
    opt = fxbt.optimize(model, (torch.randn(2, 8),), inplace=False)
    report = fxbt.report(opt)
    assert not report.reports and report.compiled, str(report)  # no captured graph: torch.compile's
    history = "\n".join(report.history)
    assert all(f"{name}: " in history for name in ("hf_fx", "dynamo", "fx")), history
    assert "test_capture.py:" in report.compiled[0].reason and "if x.sum() > 0:" in report.compiled[0].reason
    with torch.no_grad():
        for x in (torch.ones(3, 8), -torch.ones(3, 8)):  # both branches
            assert torch.equal(opt(x), model(x))
    assert not report.original_calls
    with pytest.raises(fxbt.FxbtError, match="no single graph: its calls run through torch.compile"):
        fxbt.unroll(opt)


def test_a_chosen_frontend_that_cannot_capture_raises_with_its_reason():
    with pytest.raises(fxbt.CaptureError) as info:
        fxbt.optimize(DataDependentBranch(), (torch.randn(2, 8),), frontend="fx")
    assert set(info.value.reasons) == {"fx"} and "control flow" in info.value.reasons["fx"]
    assert isinstance(info.value, fxbt.FxbtError)


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


def test_a_forward_that_changes_its_own_values_is_refused():
    """A graph would hold the counter's value at capture: refused with the reason, not a silent wrong answer."""
    class Stateful(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return x * self.calls

    model = Stateful()
    with pytest.raises(fxbt.CaptureError, match="changes values of its own on every call"):
        fxbt.optimize(model, (torch.ones(2, 3),), frontend="fx")
    assert model.calls == 0  # and capture left the counter where it was



class KeepsItsTable(nn.Module):
    """Keeps its table cast to the input's type on ``self``, as CodeGen keeps its table moved to the ids' device:
    the same tensor where it is of that type already, so calls change nothing; traced, the forward stores a
    proxy there."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.table = torch.randn(16, 8)  # a plain attribute, neither a parameter nor a buffer

    def forward(self, x):
        self.table = self.table.type_as(x)
        return self.proj(x) + self.table.narrow(0, 0, x.shape[1])


class StoresItsRows(KeepsItsTable):
    """Stores a new tensor on ``self`` on every call: a graph cannot repeat that."""

    def forward(self, x):
        self.rows = self.table.narrow(0, 0, x.shape[1])
        return self.proj(x) + self.rows


@pytest.mark.parametrize("frontend", ["dynamo", None])  # plain fx cannot trace type_as on a traced input
def test_capture_leaves_the_models_attributes_as_they_were(frontend):
    model = KeepsItsTable().eval()
    x = torch.randn(2, 5, 8)
    table = model.table
    fxbt.optimize(model, (x,), frontend=frontend)
    assert model.table is table, type(model.table)
    probe = torch.randn(3, 7, 8)
    with torch.no_grad():
        want = model.proj(probe) + model.table[:7]
        assert torch.allclose(model(probe), want, atol=1e-6)
        assert torch.allclose(fxbt.restore(model)(probe), want, atol=1e-6)


@pytest.mark.parametrize("frontend", ["fx", None])
def test_a_forward_storing_a_new_tensor_on_itself_is_not_frozen_into_a_graph(frontend):
    """Refused with a frontend chosen; by default its calls run through torch.compile, which stores the tensor
    as the model does. Either way optimize leaves the attribute as it was."""
    model = StoresItsRows().eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        model(x)
    rows = model.rows
    if frontend:
        with pytest.raises(fxbt.CaptureError, match="rows was replaced"):
            fxbt.optimize(model, (x,), frontend=frontend)
    else:
        fxbt.optimize(model, (x,))
    assert model.rows is rows
    if not frontend:
        with torch.no_grad():
            model(torch.randn(3, 7, 8))
        assert model.rows.shape == (7, 8)

# --- dynamo: repeated blocks traced once ---------------------------------------------------------------------


class ShiftBlock(nn.Module):
    """A block whose forward reads a plain attribute: siblings with another shift compute something else."""

    def __init__(self, shift: int):
        super().__init__()
        self.shift, self.lin, self.norm = shift, nn.Linear(8, 8), nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(torch.roll(self.lin(x), self.shift, dims=1) + x)


class ShiftStack(nn.Module):
    def __init__(self, shifts, embed: bool = True):
        super().__init__()
        self.embed = nn.Linear(8, 8) if embed else nn.Identity()
        self.blocks = nn.ModuleList(ShiftBlock(s) for s in shifts)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return x


def _block_reuse(report) -> str:
    return next((n for n in report.notes if "repeated blocks" in n), "")


@pytest.mark.parametrize("shifts, traces", [((1, 1, 1, 1), 1), ((1, 2, 1, 2), 2)])
def test_dynamo_traces_a_repeated_block_once_and_each_sibling_keeps_its_own(shifts, traces):
    """Equal sibling blocks are traced once and stamped out; a sibling whose attribute differs (the near miss)
    gets a trace of its own. Every block keeps its own weights and shift in the graph, and the graph computes
    the model on other sizes."""
    torch.manual_seed(0)
    model = ShiftStack(shifts).eval()
    optimized = fxbt.optimize(model, (torch.randn(2, 5, 8),), frontend="dynamo", inplace=False)
    report = fxbt.report(optimized)
    assert _block_reuse(report) == f"{len(shifts)} calls of repeated blocks captured from {traces} trace(s) of a block"
    graph = fxbt.unroll(optimized).graph
    rolls = [n.args[1] for n in graph.nodes if "roll" in str(n.target)]
    weights = {n.args[1].target for n in graph.nodes if n.op == "call_function" and "linear" in str(n.target)}
    assert rolls == list(shifts) and len(weights) == len(shifts) + 1
    probe = torch.randn(3, 7, 8)
    with torch.no_grad():
        assert (optimized(probe) - model(probe)).abs().max() < 1e-6
    assert ShiftBlock.forward is ShiftBlock.__dict__["forward"] and not hasattr(ShiftBlock.forward, "__wrapped__")


def test_dynamo_reuses_blocks_of_a_stack_whose_first_block_reads_the_input():
    """The first block reads a graph input, the others values computed in the graph: the others still share
    one trace (torch 2.13's stamp-out fails where it tries to reuse the first block's trace)."""
    torch.manual_seed(0)
    model = ShiftStack((1, 1, 1, 1), embed=False).eval()
    optimized = fxbt.optimize(model, (torch.randn(2, 5, 8),), frontend="dynamo", inplace=False)
    assert _block_reuse(fxbt.report(optimized)) == "3 calls of repeated blocks captured from 1 trace(s) of a block"
    probe = torch.randn(3, 7, 8)
    with torch.no_grad():
        assert (optimized(probe) - model(probe)).abs().max() < 1e-6


class NormlessFirst(ShiftStack):
    """The first block's norm is an Identity, its siblings' a LayerNorm (ModernBERT's first layer): one class,
    two structures."""

    def __init__(self):
        super().__init__((1, 1, 1, 1))
        self.blocks[0].norm = nn.Identity()


class SwitchesGradients(ShiftStack):
    """Blocks read the input directly, and the forward turns gradients off for a step of its own (as rotary
    embeddings under ``@torch.no_grad()`` do)."""

    def __init__(self):
        super().__init__((1, 1, 1, 1), embed=False)

    def forward(self, x):
        with torch.no_grad():
            offset = torch.zeros_like(x[..., :1])
        return super().forward(x + offset)


def test_dynamo_block_reuse_only_among_blocks_of_one_structure(monkeypatch):
    """Near miss: a class whose instances differ in a submodule's type is not marked, and where dynamo reused a
    trace across them anyway (forced here), the graph fails the reproduction check and every block is traced."""
    from fxbt import dynamo_frontend
    torch.manual_seed(0)
    model = NormlessFirst().eval()
    assert dynamo_frontend._repeated_block_classes(model) == set()
    assert dynamo_frontend._repeated_block_classes(ShiftStack((1, 1, 1, 1))) == {ShiftBlock}
    monkeypatch.setattr(dynamo_frontend, "_repeated_block_classes", lambda m: {ShiftBlock})
    optimized = fxbt.optimize(model, (torch.randn(2, 5, 8),), frontend="dynamo", inplace=False)
    assert not _block_reuse(fxbt.report(optimized))
    norms = [n for n in fxbt.unroll(optimized).graph.nodes if "layer_norm" in str(n.target)]
    assert len(norms) == 3
    probe = torch.randn(3, 7, 8)
    with torch.no_grad():
        assert (optimized(probe) - model(probe)).abs().max() < 1e-6


def test_dynamo_never_records_the_models_own_gradient_switches():
    """Tracing with gradients on (for block reuse) would record the model's own ``no_grad`` as switches in the
    graph, which would turn gradients on inside a caller's ``no_grad``: such a trace is refused."""
    torch.manual_seed(0)
    model = SwitchesGradients().eval()
    optimized = fxbt.optimize(model, (torch.randn(2, 5, 8),), frontend="dynamo", inplace=False)
    graph = fxbt.unroll(optimized).graph
    assert not any(n.target is torch._C._set_grad_enabled for n in graph.nodes)
    probe = torch.randn(3, 7, 8)
    with torch.no_grad():
        assert (optimized(probe) - model(probe)).abs().max() < 1e-6
        assert not torch.is_grad_enabled()


def test_dynamo_graph_with_block_reuse_has_the_ops_of_a_whole_trace():
    """The stamped-out blocks written back one per call: the same operations as torch._dynamo.export's graph."""
    import importlib
    from collections import Counter

    capture_module = importlib.import_module("fxbt.capture")  # the module: fxbt.capture is also a function
    spec = zoo.SPECS["bert"]
    model = spec.build()
    args, kwargs = capture_module.split_example(model, spec.example())
    with torch.no_grad():
        reused, _ = capture_module._dynamo(model, args, kwargs)
        whole = capture_module._dynamo_export(model, args, kwargs)
    ops = lambda gm: Counter((n.op, str(n.target)) for n in gm.graph.nodes  # noqa: E731
                             if n.op in ("call_function", "call_method"))
    assert reused.meta["fxbt_block_reuse"] == (zoo.L, 1) and ops(reused) == ops(whole)


def test_dynamo_reuses_blocks_after_fxbt_packed_their_weights():
    """A model whose calls ran fxbt's encoder blocks has its Q, K and V weights as views of one packed tensor;
    a later capture (another specialization, a second optimize) still traces the block once, and the packing
    is left as it was."""
    spec = zoo.SPECS["bert"]
    model = spec.build()
    fxbt.optimize(model, spec.example(), frontend="dynamo", encoder_impl="fused")
    with torch.no_grad():
        model(**spec.probe())  # the encoder blocks pack their projections
    attention = model.encoder.layer[0].attention.self
    storages = lambda: {w.weight.untyped_storage().data_ptr()  # noqa: E731
                        for w in (attention.query, attention.key, attention.value)}
    assert len(storages()) == 1
    fxbt.optimize(model, spec.example(), frontend="dynamo", encoder_impl="fused")
    assert _block_reuse(fxbt.report(model)) == f"{zoo.L} calls of repeated blocks captured from 1 trace(s) of a block"
    assert len(storages()) == 1
    probe = spec.probe()
    want = reference(spec.build(), probe)
    with torch.no_grad():
        assert real_token_error(spec, want, model(**probe), probe) < 1e-5
