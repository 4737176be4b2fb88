"""Nodes that compute the same value: the same deterministic ops over the same inputs, read after the graph's
last mutation.

Models recompute values in every layer (T5 builds its position-bias mask again in each of them); a replacement
that reads several such values can read one, and what it derives from it per call (a mask restricted to the
real tokens) is then derived once. `ValueKeys` numbers nodes so that two nodes with the same number compute
the same value on every call: torch and operator functions and tensor methods over equally numbered
arguments. Any other node (an input, a parameter, a module call, a random op, a Python function fxbt cannot
see into) is its own value. So is every node up to the graph's last op that may write into a tensor (an
in-place op, a module or a function fxbt cannot see into): before it, a value may depend on when it is read;
after it, every tensor holds its final value, so equal ops over the same nodes give equal values.
"""
from __future__ import annotations

import torch
import torch.fx

from .meta import deterministic, writes_in_place


class ValueKeys:
    def __init__(self, graph: torch.fx.Graph):
        nodes = list(graph.nodes)
        last = max((i for i, n in enumerate(nodes) if _may_mutate(n)), default=-1)
        self._settled = set(nodes[last + 1:])  # computed after every write into a tensor
        self._keys: dict[torch.fx.Node, int] = {}
        self._interned: dict = {}

    def key(self, node: torch.fx.Node) -> int:
        """Equal for two nodes only if they compute the same value."""
        stack = [node]
        while stack:  # ancestors first, without recursion: masks can hang below a long chain of nodes
            top = stack[-1]
            if top in self._keys:
                stack.pop()
                continue
            structural = top in self._settled and _is_pure(top)
            missing = [a for a in top.all_input_nodes if a not in self._keys] if structural else []
            if missing:
                stack.extend(missing)
                continue
            stack.pop()
            structure = (top.op, top.target, _frozen(top.args, self._keys), _frozen(top.kwargs, self._keys)) \
                if structural else ("node", top)
            self._keys[top] = self._interned.setdefault(structure, len(self._interned))
        return self._keys[node]


_PURE_BUILTINS = {getattr, len, int, float, bool, max, min, abs, round, isinstance, tuple, slice}


def _is_pure(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return deterministic(node)
    if node.op != "call_function" or not deterministic(node):
        return False
    module = getattr(node.target, "__module__", None) or ""
    return module.startswith("torch") or module in ("_operator", "operator", "math") or node.target in _PURE_BUILTINS


def _frozen(value, keys):
    """A hashable stand-in for an argument: nodes by their key, containers as tuples, tensors by identity."""
    if isinstance(value, torch.fx.Node):
        return ("value", keys[value])
    if isinstance(value, (list, tuple)):
        return (type(value).__name__,) + tuple(_frozen(v, keys) for v in value)
    if isinstance(value, dict):
        return ("dict",) + tuple((k, _frozen(v, keys)) for k, v in value.items())
    if isinstance(value, slice):
        return ("slice", _frozen(value.start, keys), _frozen(value.stop, keys), _frozen(value.step, keys))
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value))
    try:
        hash(value)
    except TypeError:
        return ("object", id(value))
    return (type(value).__name__, value)  # 1 and 1.0 and True stay apart


def _may_mutate(node: torch.fx.Node) -> bool:
    """The node may write into a tensor: an in-place op, or code fxbt cannot see into."""
    if writes_in_place(node):
        return True
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target)
        return not type(module).__module__.startswith(("torch.nn", "fxbt"))
    # a Python function may write; random ops only draw numbers
    return node.op == "call_function" and not _is_pure(node) and deterministic(node)
