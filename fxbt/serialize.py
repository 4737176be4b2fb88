"""Pickling of fxbt's GraphModules.

torch.fx pickles a GraphModule as its generated code and re-traces it when loading, which would drop the
node metadata ``unroll`` needs and cannot trace the drop-in calling convention. fxbt's modules pickle
their graph instead, with only fxbt's own metadata (``fxbt_*``; frontend metadata such as fake tensors
is not picklable and not needed).
"""
from __future__ import annotations

import copy
import importlib
import pickle

from dataclasses import dataclass

import torch
import torch.fx


def make_picklable(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Give ``gm`` (its own per-instance class, as every GraphModule has) graph-based pickling, and a
    deepcopy that keeps fxbt's attributes (torch's keeps a fixed list of hooks only)."""
    type(gm).__reduce__ = _reduce
    type(gm).__deepcopy__ = _deepcopy
    return gm


def _deepcopy(self, memo):
    result = torch.fx.GraphModule.__deepcopy__(self, memo)
    for name, value in self.__dict__.items():
        if name not in result.__dict__:
            result.__dict__[name] = copy.deepcopy(value, memo)
    return make_picklable(result)


def _reduce(self):
    state = self.__dict__.copy()
    graph = state.pop("_graph")
    records = []
    for node in graph.nodes:
        target = node.target
        if node.op == "call_function" and not _picklable(target):
            target = _ByName.of(target)
        records.append((node.op, node.name, target, _names(node.args), _names(node.kwargs),
                        {k: v for k, v in node.meta.items() if k.startswith("fxbt_")}))
    return _rebuild, (state, records, graph._codegen, type(self).__name__)


@dataclass(frozen=True)
class _NodeName:
    name: str


def _names(args):
    return torch.fx.node.map_arg(args, lambda n: _NodeName(n.name))


def _nodes(args, env):
    if isinstance(args, _NodeName):
        return env[args.name]
    if isinstance(args, (tuple, list)):
        return type(args)(_nodes(a, env) for a in args)
    if isinstance(args, dict):
        return {k: _nodes(v, env) for k, v in args.items()}
    if isinstance(args, slice):
        return slice(_nodes(args.start, env), _nodes(args.stop, env), _nodes(args.step, env))
    return args


class _ByName:
    """A function pickled by its import path (pybind builtins such as ``torch._C._set_grad_enabled``)."""

    def __init__(self, module: str, qualname: str):
        self.module, self.qualname = module, qualname

    @classmethod
    def of(cls, target) -> "_ByName":
        if isinstance(target, torch._ops.OpOverload):  # torch.ops.aten.sym_size.int
            return cls("torch.ops", f"{target.namespace}.{target._opname}.{target._overloadname}")
        return cls(target.__module__, target.__qualname__)

    def resolve(self):
        obj = torch.ops if self.module == "torch.ops" else importlib.import_module(self.module)
        for part in self.qualname.split("."):
            obj = getattr(obj, part)
        return obj


def _picklable(target) -> bool:
    try:
        pickle.dumps(target)
        return True
    except Exception:
        return False


def _rebuild(state: dict, records: list, codegen, class_name: str) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    graph._codegen = codegen
    env: dict = {}
    for op, name, target, args, kwargs, meta in records:
        target = target.resolve() if isinstance(target, _ByName) else target
        node = graph.create_node(op, target, _nodes(args, env), _nodes(kwargs, env), name=name)
        node.meta = meta
        env[name] = node
    root = torch.nn.Module()
    root.__dict__.update({k: v for k, v in state.items() if k in ("_modules", "_parameters", "_buffers")})
    for name, value in state.items():  # plain tensor attributes that get_attr nodes read
        if isinstance(value, torch.Tensor) and name not in root.__dict__:
            root.__dict__[name] = value
    gm = torch.fx.GraphModule(root, graph, class_name=class_name)
    for name, value in state.items():
        if name not in gm.__dict__ and name not in ("_modules", "_parameters", "_buffers"):
            gm.__dict__[name] = value
    gm.training = state.get("training", True)
    return make_picklable(gm)
