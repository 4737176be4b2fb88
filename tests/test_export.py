"""fxbt.export: python re-imports and matches; pt2 loads and matches in a fresh process without fxbt;
dot and json mark the rewritten regions."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest
import torch
import torch.utils._pytree as pytree

import fxbt
import zoo
from conftest import reference


@pytest.fixture(scope="module")
def bert():
    spec = zoo.SPECS["bert"]
    model = spec.build()
    return spec, model, fxbt.optimize(model, spec.example())


def test_python_export_reimports_and_matches(bert, tmp_path, monkeypatch):
    spec, _, gm = bert
    fxbt.export(gm, tmp_path / "exported_bert", format="python")
    assert "def forward(self, *args, **kwargs)" in (tmp_path / "exported_bert" / "module.py").read_text()
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = importlib.import_module("exported_bert").load()
    probe = spec.probe()
    with torch.inference_mode():
        want, got = gm(**probe), loaded(**probe)
    assert type(got) is type(want)
    assert all(torch.equal(a, b) for a, b in zip(pytree.tree_leaves(want), pytree.tree_leaves(got)))


def test_pt2_export_loads_and_matches_in_a_fresh_process_without_fxbt(bert, tmp_path):
    spec, model, gm = bert
    fxbt.export(gm, tmp_path / "bert.pt2", format="pt2", example_inputs=spec.example())
    probe = spec.probe()  # another batch size and sequence length than the example
    torch.save(probe, tmp_path / "probe.pt")
    script = (
        "import sys, torch\n"
        f"program = torch.export.load(r'{tmp_path / 'bert.pt2'}')\n"
        f"out = program.module()(**torch.load(r'{tmp_path / 'probe.pt'}'))\n"
        f"torch.save(list(out), r'{tmp_path / 'out.pt'}')\n"
        "print('fxbt' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"
    got = torch.load(tmp_path / "out.pt")
    want = pytree.tree_leaves(reference(model, probe))
    assert len(got) == len(want)
    assert max((a - b).abs().max().item() for a, b in zip(want, got)) < 1e-5
    mask = probe["attention_mask"][..., None]
    with torch.inference_mode():
        ours = gm(**probe).last_hidden_state
    assert ((ours - got[0]).abs() * mask).max().item() < 1e-5


@pytest.mark.parametrize("fmt", ["dot", "json"])
def test_graph_exports_mark_the_regions(bert, tmp_path, fmt):
    _, _, gm = bert
    path = fxbt.export(gm, tmp_path / f"graph.{fmt}", format=fmt)
    text = path.read_text()
    if fmt == "json":
        nodes = json.loads(text)["nodes"]
        kernels = sorted(n["kernel"] for n in nodes if n.get("region"))
        assert kernels == ["fused_encoder"] * zoo.L
    else:
        assert text.startswith("digraph") and text.count("-> fused_encoder") == zoo.L


def test_export_errors_say_what_to_do(bert, tmp_path):
    _, _, gm = bert
    with pytest.raises(fxbt.InputError, match="unknown export format"):
        fxbt.export(gm, tmp_path / "x", format="onnx")
    with pytest.raises(fxbt.InputError, match="example_inputs"):
        fxbt.export(gm, tmp_path / "x.pt2", format="pt2")
