"""fxbt.export: python re-imports and matches; pt2 loads and matches in a fresh process without fxbt;
dot and json mark the rewritten regions. Artefacts are safe: weights.pt holds tensors only and a tampered
one is refused, not run; a non-empty target needs overwrite=True; symlinks are refused, never followed;
every path problem is an ExportError."""
from __future__ import annotations

import builtins
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.utils._pytree as pytree

import fxbt
import handwritten as hw
import zoo
from conftest import reference


@pytest.fixture(scope="module")
def bert():
    spec = zoo.SPECS["bert"]
    model = spec.build()
    return spec, model, fxbt.optimize(model, spec.example(), inplace=False)


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


def test_python_export_of_a_padding_free_stack_runs_both_paths(tmp_path, monkeypatch):
    """A padding-free region exported and re-imported: a padded call takes the packed path, an unpadded one its
    original subgraph (both as the optimized model computes them)."""
    spec = zoo.SPECS["llama"]
    gm = fxbt.optimize(spec.build("sdpa"), zoo.make_inputs(spec, 3, 9, True, seed=1, left=True), inplace=False,
                       frontend="dynamo")
    assert fxbt.report(gm).rewritten("padding_free")
    fxbt.export(gm, tmp_path / "exported_llama", format="python")
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = importlib.import_module("exported_llama").load()
    (region,) = [m for m in loaded.modules() if isinstance(m, fxbt.region.Region) and m.kernel == "padding_free"]
    for pad, path in ((True, "replacement"), (False, "no token is padding in this call")):
        probe = zoo.make_inputs(spec, 4, 12, pad, seed=2, left=True)
        with torch.inference_mode():
            want, got = gm(**probe), loaded(**probe)
        assert all(torch.equal(a, b) for a, b in zip(pytree.tree_leaves(want), pytree.tree_leaves(got)))
        assert region.last_path == path


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
        assert kernels == ["padding_free"]
    else:
        assert text.startswith("digraph") and text.count("-> padding_free") == 1


def test_export_errors_say_what_to_do(bert, tmp_path):
    _, model, gm = bert
    with pytest.raises(fxbt.InputError, match="unknown export format"):
        fxbt.export(gm, tmp_path / "x", format="onnx")
    with pytest.raises(fxbt.InputError, match="example_inputs"):
        fxbt.export(gm, tmp_path / "x.pt2", format="pt2")
    with pytest.raises(fxbt.InputError, match="not optimized by fxbt.optimize"):
        fxbt.export(model, tmp_path / "x")
    with pytest.raises(fxbt.InputError, match="takes a model fxbt.optimize returned"):
        fxbt.export("model", tmp_path / "x")


def reimport(folder: Path, monkeypatch):
    """The exported folder's ``load()``, imported fresh (a package named after the folder)."""
    monkeypatch.syspath_prepend(str(folder.parent))
    importlib.invalidate_caches()
    sys.modules.pop(folder.name, None)
    sys.modules.pop(f"{folder.name}.module", None)
    return importlib.import_module(folder.name).load


def test_weights_pt_holds_only_tensors_and_loads_with_weights_only(bert, tmp_path, monkeypatch):
    spec, _, gm = bert
    folder = fxbt.export(gm, tmp_path / "tensors_only", format="python")
    state = torch.load(folder / "weights.pt", weights_only=True)
    assert state and all(isinstance(t, torch.Tensor) for t in state.values())
    loaded = reimport(folder, monkeypatch)()
    assert fxbt.report(loaded).rewritten() == fxbt.report(gm).rewritten()  # from report.json
    assert "weights_only=False" not in (folder / "module.py").read_text()


class Payload:
    """Unpickling this opens (creates) ``marker``: what a crafted weights.pt could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


def test_a_crafted_weights_pt_is_refused_not_run(bert, tmp_path, monkeypatch):
    _, _, gm = bert
    folder = fxbt.export(gm, tmp_path / "crafted", format="python")
    torch.save({"weights": Payload(tmp_path / "armed")}, folder / "weights.pt")
    torch.load(folder / "weights.pt", weights_only=False)
    assert (tmp_path / "armed").exists()  # the payload works: unpickled, it runs
    torch.save({"weights": Payload(tmp_path / "ran")}, folder / "weights.pt")
    load = reimport(folder, monkeypatch)
    with pytest.raises(fxbt.ExportError, match="not a valid fxbt export"):
        load()
    assert not (tmp_path / "ran").exists()
    torch.save({"not": torch.zeros(1)}, folder / "weights.pt")  # only tensors, but not the export's
    with pytest.raises(fxbt.ExportError, match="not a valid fxbt export"):
        load()


def test_python_export_rebuilds_plain_pytorch_modules(tmp_path, monkeypatch):
    """The fx frontend keeps nn.Linear and nn.LayerNorm as modules: rebuilt from code, weights from tensors."""
    torch.manual_seed(0)
    model = hw.Stack(lambda: hw.SizeScaledBlock("head_dim")).eval()
    gm = fxbt.optimize(model, hw.inputs(), frontend="fx", encoder_impl="fused")
    assert fxbt.report(gm).rewritten("fused_encoder")
    folder = fxbt.export(gm, tmp_path / "exported_stack", format="python")
    loaded = reimport(folder, monkeypatch)()
    probe = hw.inputs(batch=3, seq=5)
    with torch.inference_mode():
        assert torch.equal(gm(*probe), loaded(*probe))


def test_state_only_pickling_could_write_is_refused_before_writing(bert, tmp_path, monkeypatch):
    _, _, gm = bert
    monkeypatch.setitem(fxbt.api.graph_module(gm).fxbt_region_0.params, "custom", lambda x: x)
    with pytest.raises(fxbt.ExportError, match="fxbt_region_0.params.custom: .* cannot be imported by name"):
        fxbt.export(gm, tmp_path / "lambda", format="python")
    assert not (tmp_path / "lambda").exists()


@pytest.mark.parametrize("fmt", ["python", "json", "dot"])
def test_a_non_empty_target_needs_overwrite(bert, tmp_path, monkeypatch, fmt):
    spec, _, gm = bert
    target = tmp_path / ("exported_again" if fmt == "python" else f"graph.{fmt}")
    fxbt.export(gm, target, format=fmt)
    with pytest.raises(fxbt.ExportError, match=r"overwrite=True \(fxbt export --overwrite\)") as refused:
        fxbt.export(gm, target, format=fmt)
    assert str(target) in str(refused.value)
    fxbt.export(gm, target, format=fmt, overwrite=True)
    if fmt == "python":
        probe = spec.probe()
        with torch.inference_mode():
            assert torch.equal(gm(**probe).last_hidden_state,
                               reimport(target, monkeypatch)()(**probe).last_hidden_state)


def symlink_in_folder(tmp_path):
    folder, elsewhere = tmp_path / "target", tmp_path / "elsewhere.py"
    folder.mkdir()
    (folder / "module.py").symlink_to(elsewhere)
    return folder, "python", elsewhere


def symlink_as_folder(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "target").symlink_to(tmp_path / "elsewhere")
    return tmp_path / "target", "python", tmp_path / "elsewhere"


def symlink_as_file(tmp_path):
    (tmp_path / "graph.json").symlink_to(tmp_path / "elsewhere.json")
    return tmp_path / "graph.json", "json", tmp_path / "elsewhere.json"


@pytest.mark.parametrize("plant", [symlink_in_folder, symlink_as_folder, symlink_as_file])
def test_symlinks_are_refused_never_followed(bert, tmp_path, plant):
    _, _, gm = bert
    target, fmt, elsewhere = plant(tmp_path)
    if not elsewhere.exists():
        elsewhere.write_text("untouched")
    before = sorted(p.name for p in elsewhere.iterdir()) if elsewhere.is_dir() else elsewhere.read_text()
    with pytest.raises(fxbt.ExportError, match="symbolic link"):
        fxbt.export(gm, target, format=fmt, overwrite=True)
    after = sorted(p.name for p in elsewhere.iterdir()) if elsewhere.is_dir() else elsewhere.read_text()
    assert after == before


def test_a_symlink_planted_after_the_check_is_not_followed(bert, tmp_path, monkeypatch):
    _, _, gm = bert
    exporting = sys.modules["fxbt.export"]  # the module: fxbt.export is the function
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("untouched")
    check = exporting.check_target

    def check_then_plant(path, fmt, overwrite):  # another process racing the export
        check(path, fmt, overwrite)
        Path(path).symlink_to(elsewhere)

    monkeypatch.setattr(exporting, "check_target", check_then_plant)
    with pytest.raises(fxbt.ExportError, match="symbolic link"):
        fxbt.export(gm, tmp_path / "graph.json", format="json")
    assert elsewhere.read_text() == "untouched"


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder this process cannot write in: a read-only folder, or, as root (whom permission bits do not
    stop), /proc/sys, which Linux mounts read-only."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        yield folder
    elif os.path.isdir("/proc/sys") and not os.access("/proc/sys", os.W_OK):
        yield Path("/proc/sys")
    else:
        pytest.skip("no unwritable folder for this user here")
    folder.chmod(0o755)


@pytest.mark.parametrize("case, fmt, match", [
    ("folder_is_a_file", "python", "is a file; format='python' writes a folder"),
    ("file_is_a_folder", "json", "is a folder; format='json' writes one file"),
    ("pt2_to_a_folder", "pt2", "is a folder; format='pt2' writes one file"),
    ("parent_is_a_file", "dot", "is a file, not a folder"),
])
def test_path_problems_are_export_errors(bert, tmp_path, case, fmt, match):
    spec, _, gm = bert
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder").mkdir()
    target = {"folder_is_a_file": tmp_path / "a_file", "file_is_a_folder": tmp_path / "a_folder",
              "pt2_to_a_folder": tmp_path / "a_folder", "parent_is_a_file": tmp_path / "a_file" / "g.dot"}[case]
    with pytest.raises(fxbt.ExportError, match=match):
        fxbt.export(gm, target, format=fmt, example_inputs=spec.example(), overwrite=True)


@pytest.mark.parametrize("where, fmt", [("in", "python"), ("in", "json"), ("is", "python")])
def test_an_unwritable_location_is_an_export_error(bert, unwritable_dir, where, fmt):
    _, _, gm = bert
    target = unwritable_dir if where == "is" else unwritable_dir / f"exported.{fmt}"
    with pytest.raises(fxbt.ExportError, match="not writable") as refused:
        fxbt.export(gm, target, format=fmt, overwrite=True)
    assert str(unwritable_dir) in str(refused.value)
