"""Exporting a rewritten graph: ``fxbt.export(gm, path, format=..., example_inputs=None, overwrite=False)``.

- ``"python"``: a folder with ``module.py`` (the rewritten graph's readable source, and the code that builds
  its regions and calling convention), ``weights.pt`` (its tensors and nothing else) and ``report.json``;
  ``from <folder>.module import load`` gives the module back. ``load`` reads weights.pt with
  ``torch.load(weights_only=True)``: a weights.pt holding anything but tensors is refused with an
  `ExportError`, never unpickled. Regions are fxbt modules, so importing it needs fxbt.
- ``"pt2"``: a ``torch.export`` program that ``torch.export.load`` runs without fxbt. It cannot carry
  padding removal (the packing reads the mask's values, which torch.export cannot trace), so fused encoder
  blocks are exported as their original subgraphs, with attention still SDPA. The program takes the same
  inputs and returns the model's outputs as a flat tuple (a ModelOutput cannot be deserialized without
  registering it with torch.export).
- ``"dot"`` and ``"json"``: the graph with the rewritten regions marked (networkx node-link JSON).

Where it writes: a target that exists and is not empty is replaced only with ``overwrite=True``; a symlink
at the target, or at a file name the export writes in the target folder, is refused, never followed. Path
problems are `ExportError`s, found by `check_target` before any work is done.
"""
from __future__ import annotations

import builtins
import contextlib
import dataclasses
import enum
import importlib
import inspect
import json
import keyword
import math
import os
import re
import secrets
import stat
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import networkx as nx
import torch
import torch.fx
import torch.utils._pytree as pytree

from .calling import CallSpec
from .errors import ExportError, InputError
from .meta import target_name as _target_name
from .region import Region, Slot, unroll_regions
from .report import Report, Row

FORMATS = ("python", "pt2", "dot", "json")
PYTHON_FILES = ("weights.pt", "report.json", "module.py", "__init__.py")


def export(gm: torch.fx.GraphModule, path, format: str = "python", example_inputs=None, *,
           overwrite: bool = False) -> Path:
    """Write ``gm`` to ``path`` in ``format``; ``pt2`` needs ``example_inputs`` (a dict or a tuple).
    An existing, non-empty target is replaced only with ``overwrite=True``."""
    gm = _graph_module(gm)
    path = Path(path)
    if format not in FORMATS:
        raise InputError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if format == "pt2" and example_inputs is None:
        raise InputError("format='pt2' traces the module: pass example_inputs=... (like fxbt.optimize's)")
    check_target(path, format, overwrite)
    if format == "python":
        return _python(gm, path)
    if format == "pt2":
        program = _pt2(gm, example_inputs)
        return _write_one_file(path, lambda f: torch.export.save(program, f))
    text = _graph_text(gm, format)
    return _write_one_file(path, lambda f: f.write(text.encode()))


def _graph_module(obj) -> torch.fx.GraphModule:
    """The GraphModule to export: a rewritten graph, or an optimized model's most recently used one."""
    from .api import graph_module
    from .errors import FxbtError

    if not isinstance(obj, torch.nn.Module):
        raise InputError(f"fxbt.export takes a model fxbt.optimize returned, got {type(obj).__name__}")
    try:
        return graph_module(obj)
    except FxbtError as e:
        raise InputError(f"fxbt.export: {e}") from None


# --- dot and json ------------------------------------------------------------------------------------


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


def _graph_text(gm: torch.fx.GraphModule, format: str) -> str:
    graph = as_networkx(gm)
    if format == "json":
        return json.dumps(nx.node_link_data(graph, edges="edges"), indent=1, default=str)
    return _dot(graph)


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


# --- python --------------------------------------------------------------------------------------------


def _python(gm: torch.fx.GraphModule, folder: Path) -> Path:
    report = getattr(gm, "fxbt_report", None)
    report = report if isinstance(report, Report) else None
    source = _ModuleSource(gm, with_report=report is not None)  # refuses what it cannot write, before writing
    with _os_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
    if _kind(folder) != "folder":  # replaced by a symlink since it was checked
        raise ExportError(_symlink_refused(folder))
    _write_file(folder / "weights.pt", lambda f: torch.save(source.tensors, f))
    if report is not None:
        text = json.dumps({"frontend": report.frontend, "failures": report.failures, "notes": report.notes,
                           "reason": report.reason, "rows": report.as_dicts()}, indent=1)
        _write_file(folder / "report.json", lambda f: f.write(text.encode()))
    _write_file(folder / "module.py", lambda f: f.write(source.text().encode()))
    _write_file(folder / "__init__.py", lambda f: f.write(b"from .module import FxbtModule, load\n"))
    return folder


_MODULE_INTERNALS = frozenset(vars(torch.nn.Module()))  # what nn.Module.__init__ sets, hooks included
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_REGION_ARGUMENTS = frozenset(("rule", "kernel", "replacement", "slots", "params", "fallback", "wants_training",
                               "original_arity", "last_path"))  # the constructor sets them
_SLOT_DEFAULTS = {"value": None, "many": False}
_MODULE_NAMES = frozenset(("Path", "torch", "FOLDER", "PARAMETERS", "TENSORS", "FxbtModule", "load"))


class _ModuleSource:
    """module.py for ``gm``: its graphs as ``forward`` methods, and the statements that rebuild its state
    (regions, calling convention, modules) from weights.pt, which holds only tensors.

    Non-tensor state is written as code, never pickled: literals as literals, functions and classes by
    their import path, objects shared in ``gm`` (a parameter the graph and a region's original both read,
    a region called from another region's original) built once and shared alike. What cannot be written
    so (a lambda, an object of a class defined in a function) is refused with an ExportError."""

    def __init__(self, gm: torch.fx.GraphModule, with_report: bool):
        self.codes = {id(m): m.graph.python_code(root_module="self") for m in gm.modules()
                      if isinstance(m, torch.fx.GraphModule)}
        self.graph_globals = _merged_globals(self.codes.values())
        self.statements: list[str] = []  # FxbtModule.__init__'s body after weights are loaded
        self.classes: list[str] = []  # a class per subgraph (a region's original)
        self.tensors: dict[str, torch.Tensor] = {}  # weights.pt
        self.parameters: dict[str, bool] = {}  # weights.pt names that are parameters -> requires_grad
        self.imports: dict[str, tuple[str, str]] = {}  # alias -> (module, name)
        self._built: dict[int, str] = {}  # id(object) -> the expression that names it
        self._alive: list = []  # keeps the objects behind ``_built``'s ids alive
        self._taken = set(self.graph_globals) | _MODULE_NAMES | {"self", "weights"}
        self._built[id(gm)] = "self"
        self._fill(gm, "self", "")
        if with_report:
            self.statements.append(f"self.fxbt_report = {self._name(load_report)}(FOLDER / 'report.json')")
        self._load_weights = self._name(load_weights)
        self._forward = _forward_method(self.codes[id(gm)])

    def text(self) -> str:
        from torch.fx.graph_module import _format_import_block, sys_importer

        parameters = "".join(f"    {k!r}: {v},\n" for k, v in self.parameters.items())
        tensors = "".join(f"    {k!r},\n" for k in self.tensors if k not in self.parameters)
        body = "\n".join(f"        {s}" for s in self.statements)
        return f'''"""The graph fxbt rewrote, as Python. ``load()`` returns it as a module.

weights.pt holds its tensors only and is read with ``torch.load(weights_only=True)``, so a weights.pt
holding anything else is refused, never run; report.json holds fxbt's report. The code below rebuilds the
rest. Regions (``fxbt_region_*``) are fxbt modules: importing this needs fxbt installed.
"""
from pathlib import Path

import torch
{_format_import_block(self.graph_globals, sys_importer)}
{self._import_lines()}

FOLDER = Path(__file__).parent
# weights.pt, by name: the parameters (with requires_grad) and the other tensors
PARAMETERS = {{
{parameters}}}
TENSORS = [
{tensors}]


{"".join(c + chr(10) + chr(10) for c in self.classes)}class FxbtModule(torch.nn.Module):
    def __init__(self):
        super().__init__()
        weights = {self._load_weights}(FOLDER / "weights.pt", PARAMETERS, TENSORS)
{body}

{self._forward}

def load() -> FxbtModule:
    return FxbtModule().eval()
'''

    def _import_lines(self) -> str:
        by_module: dict[str, list[str]] = {}
        for alias, (module, name) in sorted(self.imports.items(), key=lambda item: item[1]):
            by_module.setdefault(module, []).append(name if alias == name else f"{name} as {alias}")
        return "\n".join(f"from {module} import {', '.join(names)}" for module, names in sorted(by_module.items()))

    # --- modules

    def _module(self, module: torch.nn.Module, path: str) -> str:
        if isinstance(module, Region):
            return self._region(module, path)
        if isinstance(module, torch.fx.GraphModule):
            cls = self._fresh("Graph_" + _identifier(path))
            self.classes.append(f"class {cls}(torch.nn.Module):\n{_forward_method(self.codes[id(module)])}")
            return self._build(module, path, f"{cls}()")
        if type(module) is torch.nn.Module:
            return self._build(module, path, "torch.nn.Module()")
        return self._build(module, path, f"{self._name(new_module)}({self._reference(type(module), path)})")

    def _region(self, region: Region, path: str) -> str:
        args = [repr(region.rule), repr(region.kernel)] + [
            f"{name}={self._value(getattr(region, name), f'{path}.{name}')}"
            for name in ("original", "replacement", "slots", "params", "fallback")]
        return self._build(region, path, f"{self._reference(type(region), path)}({', '.join(args)})",
                           children_built=("original",))

    def _build(self, module, path: str, construct: str, children_built=()) -> str:
        name = self._remember(module, self._fresh(_identifier(path) or "module"))
        self.statements.append(f"{name} = {construct}")
        self._fill(module, name, path, children_built)
        return name

    def _fill(self, module: torch.nn.Module, name: str, path: str, children_built=()) -> None:
        """Statements giving ``module`` (built as ``name``) its parameters, buffers, children and attributes."""
        if hooks := [h for h in _HOOKS if getattr(module, h, None)]:
            raise ExportError(f"cannot export {path or 'the module'}: it has {', '.join(hooks)}, which an export "
                              "cannot carry; remove them, or export with format='pt2'")
        for key, param in module._parameters.items():
            self.statements.append(f"{name}.register_parameter({key!r}, {self._value(param, _join(path, key))})")
        for key, buffer in module._buffers.items():
            persistent = key not in module._non_persistent_buffers_set
            self.statements.append(f"{name}.register_buffer({key!r}, {self._value(buffer, _join(path, key))}, "
                                   f"persistent={persistent})")
        for key, child in module._modules.items():
            if key not in children_built:
                self.statements.append(f"{name}.add_module({key!r}, {self._value(child, _join(path, key))})")
        for key, value in _attributes(module).items():
            target = f"{name}.{key}" if key.isidentifier() and not keyword.iskeyword(key) else None
            value = self._value(value, _join(path, key))
            self.statements.append(f"{target} = {value}" if target else f"setattr({name}, {key!r}, {value})")

    # --- values

    def _value(self, value, path: str) -> str:
        """A Python expression for ``value``; ``path`` names it in weights.pt and in error messages."""
        if id(value) in self._built:
            return self._built[id(value)]
        if value is None or type(value) in (bool, int, str, bytes):
            return repr(value)
        if type(value) is float:
            return repr(value) if math.isfinite(value) else f"float({str(value)!r})"
        if isinstance(value, torch.Tensor):
            return self._tensor(value, path)
        if isinstance(value, torch.nn.Module):
            return self._module(value, path)
        if isinstance(value, (torch.dtype, torch.device, torch.Size)):
            return _torch_literal(value)
        if isinstance(value, pytree.TreeSpec):
            return self._treespec(value, path)
        if type(value) in (tuple, list, dict, set, frozenset):
            return self._container(value, path)
        if isinstance(value, (type, enum.Enum)) or inspect.isroutine(value) or isinstance(value, tuple):
            return self._named(value, path)
        if isinstance(value, Slot):
            return self._slot(value, path)
        if dataclasses.is_dataclass(value) and _constructible(value):
            value = _portable_call(value) if isinstance(value, CallSpec) else value
            fields = [f"{f.name}={self._value(getattr(value, f.name), f'{path}.{f.name}')}"
                      for f in dataclasses.fields(value)]
            return f"{self._reference(type(value), path)}({', '.join(fields)})"
        return self._object(value, path)

    def _slot(self, slot: Slot, path: str) -> str:
        """``Slot(index=...)``: its constructor only stores its arguments; defaults left out."""
        given = [f"{k}={self._value(v, path)}" for k, v in vars(slot).items() if v is not _SLOT_DEFAULTS.get(k, ...)]
        return f"{self._reference(Slot, path)}({', '.join(given)})"

    def _tensor(self, tensor: torch.Tensor, path: str) -> str:
        self.tensors[path] = tensor.detach()  # the data only: whether it is a parameter is in module.py
        if isinstance(tensor, torch.nn.Parameter):
            self.parameters[path] = tensor.requires_grad
        return self._remember(tensor, f"weights[{path!r}]")

    def _container(self, value, path: str) -> str:
        if isinstance(value, dict):
            return "{" + ", ".join(f"{self._value(k, path)}: {self._value(v, _join(path, str(k)))}"
                                   for k, v in value.items()) + "}"
        items = [self._value(v, f"{path}.{i}") for i, v in enumerate(value)]
        if type(value) is tuple:
            return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
        if type(value) is list:
            return "[" + ", ".join(items) + "]"
        return f"{type(value).__name__}([{', '.join(items)}])"

    def _named(self, value, path: str) -> str:
        """Classes, functions, enum members, bound methods and namedtuples: named by import path."""
        if isinstance(value, enum.Enum):
            return f"{self._reference(type(value), path)}[{value.name!r}]"
        if inspect.ismethod(value):
            return f"{self._value(value.__self__, path)}.{value.__func__.__name__}"
        if isinstance(value, tuple):  # a namedtuple
            items = ", ".join(self._value(v, f"{path}.{i}") for i, v in enumerate(value))
            return f"{self._reference(type(value), path)}({items})"
        return self._reference(value, path)

    def _treespec(self, spec: pytree.TreeSpec, path: str) -> str:
        """A pytree spec as torch's JSON form. Loading it resolves only types registered with pytree,
        which importing each node type's module does (a transformers ModelOutput registers itself)."""
        try:
            text = pytree.treespec_dumps(spec)
        except Exception as e:
            raise ExportError(f"cannot export {path}: its pytree spec cannot be serialized ({e}); register "
                              "the output type with torch.utils._pytree, or export with format='pt2'") from None
        for node_type in _node_types(spec):
            if node_type.__module__ != "builtins":
                self._reference(node_type, path)
        return f"{self._name(pytree.treespec_loads)}({text!r})"

    def _object(self, value, path: str) -> str:
        """Any other object: its class by import path and its ``__getstate__`` (pickle's own protocol,
        with the class named by code here, not by the file), built once if shared."""
        custom = getattr(type(value), "__getstate__", None) not in (None, getattr(object, "__getstate__", None))
        state = value.__getstate__() if custom else getattr(value, "__dict__", None)
        if not isinstance(state, dict):
            raise ExportError(f"cannot export {path}: a {type(value).__name__} has no attribute dictionary to "
                              "write; use plain values there, or export with format='pt2'")
        expression = f"{self._name(restore_object)}({self._reference(type(value), path)}, " \
                     f"{self._value(state, path)})"
        name = self._remember(value, self._fresh(_identifier(path) or "value"))
        self.statements.append(f"{name} = {expression}")
        return name

    # --- names

    def _reference(self, obj, path: str) -> str:
        """``obj`` (a class or function) by an import of its module, refused unless that import gives
        ``obj`` back: a lambda, a function defined in another or one in ``__main__`` cannot be imported."""
        if isinstance(obj, torch._ops.OpOverload):
            return f"torch.ops.{obj.namespace}.{obj._opname}.{obj._overloadname}"
        module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
        if not module or module == "__main__" or _resolve(module, qualname) is not obj:
            raise ExportError(f"cannot export {path}: {obj!r} cannot be imported by name (a lambda, a class or "
                              "function made at run time or inside a function, or one in __main__); define it at "
                              "the top level of a module, or export with format='pt2'")
        head, _, rest = qualname.partition(".")
        alias = next((a for a, imported in self.imports.items() if imported == (module, head)), None)
        if alias is None:
            alias = self._fresh(head)
            self.imports[alias] = (module, head)
        return f"{alias}.{rest}" if rest else alias

    def _name(self, function: Callable) -> str:
        return self._reference(function, function.__qualname__)

    def _fresh(self, base: str) -> str:
        """A name no statement, import or graph of module.py uses yet."""
        name, n = base, 1
        while name in self._taken or keyword.iskeyword(name) or hasattr(builtins, name):
            name, n = f"{base}_{n}", n + 1
        self._taken.add(name)
        return name

    def _remember(self, obj, expression: str) -> str:
        self._built[id(obj)] = expression
        self._alive.append(obj)
        return expression


def _attributes(module: torch.nn.Module) -> dict:
    """The instance attributes of ``module`` its forward needs, besides parameters, buffers and children."""
    own = {k: v for k, v in vars(module).items() if k not in _MODULE_INTERNALS}
    if isinstance(module, torch.fx.GraphModule):
        # the graph is code in module.py, so fx's bookkeeping (the Graph, hooks, tracer) is not needed;
        # the calling convention is, and plain tensors read by get_attr nodes
        return {k: v for k, v in own.items() if isinstance(v, torch.Tensor) or k in ("_in_spec", "_out_spec")
                or (k.startswith(("fxbt_", "_fxbt_")) and k != "fxbt_report")}
    if isinstance(module, Region):
        return {k: v for k, v in own.items() if k not in _REGION_ARGUMENTS}
    return own


def _portable_call(call: CallSpec) -> CallSpec:
    """``call`` with only the forward defaults module.py can write. A default is only compared with a value
    passed for an input the example did not have, so one left out makes such a call an InputError instead
    of a silently accepted one."""
    return dataclasses.replace(call, defaults={k: v for k, v in call.defaults.items() if _plain(v)})


def _plain(value) -> bool:
    if value is None or type(value) in (bool, int, float, str):
        return True
    if type(value) in (tuple, list):
        return all(map(_plain, value))
    return type(value) is dict and all(_plain(k) and _plain(v) for k, v in value.items())


def _constructible(value) -> bool:
    """A dataclass whose constructor only stores its fields, so calling it rebuilds the instance."""
    return all(f.init for f in dataclasses.fields(value)) and not hasattr(value, "__post_init__")


def _torch_literal(value) -> str:
    if isinstance(value, torch.dtype):
        return str(value)  # torch.float32
    if isinstance(value, torch.device):
        return f"torch.device({str(value)!r})"
    return f"torch.Size({list(value)!r})"


def _node_types(spec: pytree.TreeSpec):
    if spec.type is not None:
        yield spec.type
    children = spec.children() if hasattr(spec, "children") else spec.children_specs  # torch 2.13 / older
    for child in children:
        yield from _node_types(child)


def _merged_globals(codes) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for code in codes:
        for name, value in code.globals.items():
            if merged.setdefault(name, value) is not value:
                raise ExportError(f"cannot export: two graphs use the name {name!r} for different objects; "
                                  "export with format='pt2'")
    return merged


def _resolve(module: str, qualname: str):
    try:
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj
    except Exception:
        return None


def _identifier(path: str) -> str:
    name = re.sub(r"\W", "_", path)
    return f"m_{name}" if name[:1].isdigit() else name


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _forward_method(code) -> str:
    """fx's generated ``def forward``, indented as a method. The ``wrap(...)`` calls fx puts before it for
    wrapped functions matter only to re-tracing, and ``wrap`` refuses to run in a class body."""
    source = code.src[code.src.index("def forward"):]
    return "\n".join("    " + line if line.strip() else "" for line in source.strip("\n").splitlines()) + "\n"


# --- used by the module.py of a python export -----------------------------------------------------------


def load_weights(path, parameters: dict[str, bool], tensors: list[str]) -> dict[str, torch.Tensor]:
    """weights.pt of a python export: exactly the named tensors, loaded with ``weights_only=True`` so that a
    file holding anything else is refused, not run. ``parameters`` come back as Parameters."""
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:  # weights_only refuses pickled objects other than tensors and plain containers
        raise ExportError(f"{path} is not a valid fxbt export: torch.load(weights_only=True) refused it "
                          f"({type(e).__name__}); an export's weights.pt holds tensors only. Export the model "
                          "again with fxbt.export") from None
    expected = set(parameters) | set(tensors)
    if not isinstance(state, dict) or set(state) != expected or \
            not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ExportError(f"{path} is not a valid fxbt export: it does not hold the tensors module.py reads; "
                          "export the model again with fxbt.export")
    return {name: torch.nn.Parameter(t, requires_grad=parameters[name]) if name in parameters else t
            for name, t in state.items()}


def load_report(path) -> Report:
    """report.json of a python export, as the Report `fxbt.report` returns."""
    try:
        data = json.loads(Path(path).read_text())
        return Report(data["frontend"], dict(data["failures"]), list(data["notes"]),
                      [Row(**{**row, "calls": Counter(row.get("calls", {}))}) for row in data["rows"]],
                      data.get("reason", ""))
    except Exception as e:
        raise ExportError(f"{path} is not a valid fxbt report ({type(e).__name__}: {e}); export the model "
                          "again with fxbt.export") from None


def new_module(cls: type) -> torch.nn.Module:
    """An instance of ``cls`` as unpickling makes one (``__init__`` not run), ready for its state."""
    module = cls.__new__(cls)
    torch.nn.Module.__init__(module)
    return module


def restore_object(cls: type, state: dict):
    """An instance of ``cls`` from its ``__getstate__``, as unpickling makes one."""
    obj = cls.__new__(cls)
    if hasattr(obj, "__setstate__"):
        obj.__setstate__(state)
    else:
        obj.__dict__.update(state)
    return obj


# --- pt2 -----------------------------------------------------------------------------------------------


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


def _pt2(gm: torch.fx.GraphModule, example_inputs) -> torch.export.ExportedProgram:
    exportable = unroll_regions(gm, lambda region: region.kernel == "fused_encoder")
    args, kwargs = _as_call(example_inputs)
    names = gm._fxbt_call.params[:len(args)] + list(kwargs)
    module = _named(exportable, names)
    dims = {name: ({d: torch.export.Dim.AUTO for d in range(min(2, value.dim()))}
                   if isinstance(value, torch.Tensor) else None)
            for name, value in zip(names, list(args) + list(kwargs.values()))}
    try:
        return torch.export.export(module, args, kwargs, dynamic_shapes=dims, strict=False)
    except Exception:  # sizes that cannot stay symbolic: export for the example's sizes
        return torch.export.export(module, args, kwargs, strict=False)


def _as_call(example_inputs):
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    return tuple(example_inputs), {}


# --- where an export may write -------------------------------------------------------------------------


def check_target(path, format: str, overwrite: bool = False) -> None:
    """Raise an ExportError if `export` could not write ``format`` at ``path``; changes nothing on disk, so
    callers run it before the work (the command line, before optimizing the model)."""
    path = Path(path)
    kind = _kind(path)
    if kind is None:
        return _check_creatable(path)
    if kind == "symlink":
        raise ExportError(_symlink_refused(path))
    if format == "python":
        return _check_folder(path, kind, overwrite)
    if kind == "folder":
        raise ExportError(f"{path} is a folder; format={format!r} writes one file: pass a file path, such as "
                          f"{path / ('model.' + format)}")
    if kind != "file":
        raise ExportError(f"{path} is not a regular file; pass a path to a file or to nothing yet")
    _check_writable(path.parent, path)
    if path.stat().st_size and not overwrite:
        raise ExportError(f"{path} exists; pass overwrite=True (fxbt export --overwrite) to replace it, or "
                          "another path")


def _check_folder(folder: Path, kind: str, overwrite: bool) -> None:
    if kind != "folder":
        raise ExportError(f"{folder} is {'a file' if kind == 'file' else 'not a folder'}; format='python' writes "
                          "a folder (module.py, weights.pt): pass a folder path")
    _check_writable(folder, folder)
    if not overwrite and any(folder.iterdir()):
        raise ExportError(f"{folder} is not empty; pass overwrite=True (fxbt export --overwrite) to replace the "
                          "export in it, or an empty or new folder")
    for name in PYTHON_FILES:
        _refuse_symlink_or_folder(folder / name)


def _check_creatable(path: Path) -> None:
    """``path`` does not exist: its nearest existing ancestor must be a folder we can write in."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ExportError(f"cannot create {path}: {ancestor} is a file, not a folder; choose a path in a folder")
    _check_writable(ancestor, path)


def _check_writable(folder: Path, target: Path) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {target}: {folder} is not writable (permission denied or read-only); "
                          "choose a location you can write to")


def _kind(path: Path) -> str | None:
    """What is at ``path`` itself, a symlink not followed: None, "symlink", "folder", "file" or "other"."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise ExportError(f"cannot inspect {path}: {e.strerror}; choose a location you can write to") from None
    if stat.S_ISLNK(mode):
        return "symlink"
    return "folder" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"


def _refuse_symlink_or_folder(path: Path) -> None:
    kind = _kind(path)
    if kind == "symlink":
        raise ExportError(_symlink_refused(path))
    if kind not in (None, "file"):
        raise ExportError(f"{path} is not a regular file, so the export cannot replace it; remove it, or "
                          "export to another folder")


def _symlink_refused(path: Path) -> str:
    return (f"{path} is a symbolic link; fxbt writes only to real files and folders, even with overwrite=True: "
            "remove the link, or pass the path it points to")


def _write_one_file(path: Path, write: Callable[[Any], None]) -> Path:
    with _os_errors(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    _write_file(path, write)
    return path


_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)


def _write_file(path: Path, write: Callable[[Any], None]) -> None:
    """Write ``path`` through a new file beside it, renamed over it once complete. The new file is created
    exclusively (O_EXCL, O_NOFOLLOW), and a rename replaces the name ``path``, not what a symlink there
    points to; a symlink is refused anyway, here as in `check_target`."""
    _refuse_symlink_or_folder(path)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    with _os_errors(path):
        fd = os.open(temporary, _NEW_FILE, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise


@contextlib.contextmanager
def _os_errors(path: Path):
    try:
        yield
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e.strerror or e}; choose a location you can write to") from e
