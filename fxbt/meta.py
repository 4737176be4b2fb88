"""Node metadata: shapes, dtypes and small constant values from one run on the example inputs.

Each node gets ``node.meta["fxbt_val"]``: a `TensorInfo` for a tensor, the value itself for Python
scalars, sizes, dtypes and tuples of those. Nodes whose value depends on the inputs' *sizes* only
(causal masks, position ids, scales computed from a head size) are marked ``shape_only`` and keep
their real tensor value, so checks can evaluate them.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

_SIZE_METHODS = {"size", "dim", "numel"}
_SIZE_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "is_nested"}
_KEEP_NUMEL = 1 << 22


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple
    dtype: torch.dtype
    device: torch.device
    value: torch.Tensor | None = None  # kept for shape-only tensors

    @property
    def ndim(self) -> int:
        return len(self.shape)


def is_size_query(node: torch.fx.Node) -> bool:
    """A node that reads a tensor's size, rank, dtype or device, never its data."""
    if node.op == "call_method":
        return node.target in _SIZE_METHODS
    if node.op == "call_function":
        if node.target is getattr and len(node.args) > 1:
            return node.args[1] in _SIZE_ATTRS
        return node.target in (torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default, torch.ops.aten.sym_size)
    return False


def depends_on_sizes(node: torch.fx.Node) -> bool:
    """Does this value read a tensor's size (not only its dtype or device) on the way from the inputs?"""
    seen, frontier = set(), [node]
    while frontier:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        if is_size_query(n) and not (n.op == "call_function" and n.target is getattr and n.args[1] in
                                     ("dtype", "device")):
            return True
        frontier.extend(n.all_input_nodes)
    return False


def shape_only_nodes(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Nodes whose value is a function of input sizes, parameters and buffers alone (so, for given sizes and
    weights, always the same value: random and uninitialised tensors are not). A tensor an in-place op later
    writes other values into is not, nor is anything computed from it."""
    found = _shape_only(graph, set())
    written = {base for node in graph.nodes if writes_in_place(node) and not all(a in found for a in node.all_input_nodes)
               for base in written_by(node)}
    return _shape_only(graph, written) if written else found


_VIEWS = {"getitem", "view", "reshape", "transpose", "permute", "expand", "expand_as", "narrow", "select", "squeeze",
          "unsqueeze", "contiguous", "detach", "to", "type", "float", "half", "t", "flatten", "unflatten", "as_strided",
          "view_as", "reshape_as", "split", "chunk", "unbind", "swapaxes", "movedim", "type_as"}


_IN_PLACE_OPERATORS = {operator.setitem, operator.delitem, operator.iadd, operator.isub, operator.imul,
                       operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow, operator.iand,
                       operator.ior, operator.ixor, operator.ilshift, operator.irshift, operator.imatmul}
_IN_PLACE_METHODS = {f"__{op.__name__}__" for op in _IN_PLACE_OPERATORS}  # x.__iadd__(y), x.__setitem__(i, y)


def writes_in_place(node: torch.fx.Node) -> bool:
    """An op that writes into a tensor it is given (its first argument, or ``out=``): ``x.masked_fill_(...)``,
    ``x[i] = y``, ``x += y``, ``torch.relu_(x)``, a mutable aten overload."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_") or node.target in _IN_PLACE_METHODS
    if node.op != "call_function":
        return False
    if node.target in _IN_PLACE_OPERATORS or "out" in node.kwargs:
        return True
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    name = getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.startswith("_") and \
        getattr(node.target, "__module__", "") not in ("_operator", "operator")  # operator.and_ is ``&``


def written_by(node: torch.fx.Node) -> set:
    """What an in-place op writes into: its target and every tensor that target may be a view of."""
    return _bases(node.kwargs.get("out", node.args[0] if node.args else None))


def _bases(node: torch.fx.Node) -> set:
    """``node`` and the tensors it may be a view of (their memory is written with it)."""
    found, frontier = set(), [node]
    while frontier:
        n = frontier.pop()
        if n in found or not isinstance(n, torch.fx.Node):
            continue
        found.add(n)
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        if name in _VIEWS and n.args:
            frontier.append(n.args[0])
    return found


def _shape_only(graph: torch.fx.Graph, excluded: set) -> set[torch.fx.Node]:
    found: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if node in excluded:
            continue
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "get_attr" or is_size_query(node):
            found.add(node)
            continue
        if node.op == "call_module" or not deterministic(node):
            continue
        if all(x in found for x in node.all_input_nodes):
            found.add(node)
    return found


# words of the names of ops that draw random numbers or leave memory uninitialised (``rand_like``, ``randn``,
# ``new_empty``, ``native_dropout``, ``normal_``...); whole words, so that ``normalize`` is not one of them
_NONDETERMINISTIC = frozenset({"rand", "randn", "randint", "randperm", "random", "empty", "dropout", "bernoulli",
                               "normal", "uniform", "multinomial", "exponential", "cauchy", "geometric", "poisson",
                               "gumbel", "rrelu"})


def deterministic(node: torch.fx.Node) -> bool:
    return _NONDETERMINISTIC.isdisjoint(re.split(r"[._]", target_name(node)))


def target_name(node: torch.fx.Node) -> str:
    """The name of what a node calls: a method's name, a function's ``__name__``."""
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def ancestors(nodes) -> set:
    """``nodes`` (the fx nodes among them) and every node they are computed from."""
    found, frontier = set(), [n for n in nodes if isinstance(n, torch.fx.Node)]
    while frontier:
        n = frontier.pop()
        if n not in found:
            found.add(n)
            frontier.extend(n.all_input_nodes)
    return found


def describe(value: Any, keep: bool) -> Any:
    if isinstance(value, torch.Tensor):
        small = keep and not value.is_nested and value.numel() <= _KEEP_NUMEL
        return TensorInfo(tuple(value.shape), value.dtype, value.device, value.detach() if small else None)
    if isinstance(value, (tuple, list)):
        return type(value)(describe(v, keep) for v in value) if not isinstance(value, torch.Size) else tuple(value)
    if isinstance(value, (int, float, bool, str, torch.dtype, torch.device, type(None), slice)):
        return value
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return value
    return None


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm, keep):
        super().__init__(gm)
        self.keep = keep

    def run_node(self, n):
        result = super().run_node(n)
        n.meta["fxbt_val"] = describe(result, n in self.keep)
        return result


def propagate(gm: torch.fx.GraphModule, flat_inputs: list):
    """Run ``gm`` once on ``flat_inputs``, record every node's `fxbt_val`, return the flat outputs."""
    keep = shape_only_nodes(gm.graph)
    for node in gm.graph.nodes:
        node.meta["fxbt_shape_only"] = node in keep
    with torch.no_grad():
        return _Recorder(gm, keep).run(*flat_inputs)


def val(node_or_const) -> Any:
    """The recorded value of a node, or the constant itself."""
    if isinstance(node_or_const, torch.fx.Node):
        return node_or_const.meta.get("fxbt_val")
    return node_or_const


