"""Exporting a rewritten graph: ``fxbt.export(gm, path, format=...)``.

- ``"python"``: a folder with ``module.py`` (the rewritten graph's readable source, one ``forward``) and
  ``weights.pt``; ``from <folder>.module import load`` gives the module back. Regions are fxbt modules, so
  importing it needs fxbt.
- ``"pt2"``: a ``torch.export`` program that ``torch.export.load`` runs without fxbt. It cannot carry
  padding removal (the packing reads the mask's values, which torch.export cannot trace), so fused encoder
  blocks are exported as their original subgraphs, with attention still SDPA. The program takes the same
  inputs and returns the model's outputs as a flat tuple (a ModelOutput cannot be deserialized without
  registering it with torch.export).
- ``"dot"`` and ``"json"``: the graph with the rewritten regions marked (networkx node-link JSON).
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import networkx as nx
import torch
import torch.fx
import torch.utils._pytree as pytree

from .errors import InputError
from .region import Region, unroll_regions

FORMATS = ("python", "pt2", "dot", "json")


def export(gm: torch.fx.GraphModule, path, format: str = "python", example_inputs=None) -> Path:
    """Write ``gm`` to ``path`` in ``format``; ``pt2`` needs ``example_inputs`` (a dict or a tuple)."""
    path = Path(path)
    if format not in FORMATS:
        raise InputError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if format == "python":
        return _python(gm, path)
    if format == "pt2":
        if example_inputs is None:
            raise InputError("format='pt2' traces the module: pass example_inputs=... (like fxbt.optimize's)")
        return _pt2(gm, path, example_inputs)
    graph = as_networkx(gm)
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "json":
        path.write_text(json.dumps(nx.node_link_data(graph, edges="edges"), indent=1, default=str))
    else:
        path.write_text(_dot(graph))
    return path


def as_networkx(gm: torch.fx.GraphModule) -> nx.DiGraph:
    """The top-level graph: one node per FX node, rewritten regions marked with their rule and kernel."""
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        attrs = {"op": node.op, "target": _target_name(node)}
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, Region):
            attrs.update(region=True, rule=module.rule, kernel=module.kernel,
                         original_nodes=len(module.original.graph.nodes))
        graph.add_node(node.name, **attrs)
        for source in node.all_input_nodes:
            graph.add_edge(source.name, node.name)
    return graph


def _target_name(node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _dot(graph: nx.DiGraph) -> str:
    lines = ["digraph fxbt {", "  node [shape=box, fontsize=10];"]
    for name, attrs in graph.nodes(data=True):
        label = f"{name}\\n{attrs['target']}"
        style = ""
        if attrs.get("region"):
            label = f"{name}\\n{attrs['rule']} -> {attrs['kernel']}\\n({attrs['original_nodes']} nodes)"
            style = ', style=filled, fillcolor="#9fd39f"'
        lines.append(f'  "{name}" [label="{label}"{style}];')
    lines += [f'  "{a}" -> "{b}";' for a, b in graph.edges]
    return "\n".join(lines + ["}"]) + "\n"


def _python(gm: torch.fx.GraphModule, folder: Path) -> Path:
    from torch.fx.graph_module import _format_import_block, sys_importer

    folder.mkdir(parents=True, exist_ok=True)
    code = gm.graph.python_code(root_module="self")
    state = {
        "modules": dict(gm.named_children()),
        "parameters": dict(gm._parameters),
        "buffers": dict(gm._buffers),
        "attributes": {k: v for k, v in gm.__dict__.items()
                       if k in ("_fxbt_call", "_in_spec", "_out_spec", "fxbt_report") or
                       (isinstance(v, torch.Tensor) and not k.startswith("_"))},
    }
    torch.save(state, folder / "weights.pt")
    body = "\n".join("    " + line if line.strip() else line for line in code.src.splitlines())
    source = f'''"""The graph fxbt rewrote, as Python. ``load()`` returns it as a module; weights.pt holds its state.

Regions (``self.fxbt_region_*``) are fxbt modules: importing this needs fxbt installed.
"""
from pathlib import Path

import torch
{_format_import_block(code.globals, sys_importer)}


class FxbtModule(torch.nn.Module):
    def __init__(self):
        super().__init__()
        state = torch.load(Path(__file__).with_name("weights.pt"), weights_only=False)
        for name, module in state["modules"].items():
            self.add_module(name, module)
        for name, value in state["parameters"].items():
            self.register_parameter(name, value)
        for name, value in state["buffers"].items():
            self.register_buffer(name, value)
        for name, value in state["attributes"].items():
            setattr(self, name, value)
{body}


def load() -> FxbtModule:
    return FxbtModule().eval()
'''
    (folder / "module.py").write_text(source)
    (folder / "__init__.py").write_text("from .module import FxbtModule, load\n")
    return folder


class _FlatOutputs(torch.nn.Module):
    """The module with the same inputs and its outputs as a flat tuple (loadable without fxbt)."""

    def __init__(self, gm):
        super().__init__()
        self.gm = gm

    def forward(self, *args, **kwargs):
        return tuple(pytree.tree_leaves(self.gm(*args, **kwargs)))


def _named(gm, names: list[str]) -> torch.nn.Module:
    """`_FlatOutputs` whose forward declares the example's input names: torch.export reads the signature
    to pair inputs with their dynamic dimensions, which it cannot do through ``**kwargs``."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    signature = inspect.Signature([inspect.Parameter("self", kind)] + [inspect.Parameter(n, kind) for n in names])

    def forward(self, *args, **kwargs):
        return _FlatOutputs.forward(self, *args, **kwargs)

    forward.__signature__ = signature
    return type("FxbtExport", (_FlatOutputs,), {"forward": forward})(gm)


def _pt2(gm: torch.fx.GraphModule, path: Path, example_inputs) -> Path:
    exportable = unroll_regions(gm, lambda region: region.kernel == "fused_encoder")
    args, kwargs = _as_call(example_inputs)
    names = gm._fxbt_call.params[:len(args)] + list(kwargs)
    module = _named(exportable, names)
    dims = {name: ({d: torch.export.Dim.AUTO for d in range(min(2, value.dim()))}
                   if isinstance(value, torch.Tensor) else None)
            for name, value in zip(names, list(args) + list(kwargs.values()))}
    try:
        program = torch.export.export(module, args, kwargs, dynamic_shapes=dims, strict=False)
    except Exception:  # sizes that cannot stay symbolic: export for the example's sizes
        program = torch.export.export(module, args, kwargs, strict=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path)
    return path


def _as_call(example_inputs):
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    return tuple(example_inputs), {}

