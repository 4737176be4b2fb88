"""Metadata reads as dynamo records them: one read per size, dtypes and devices as constants.

``b, s = x.shape[:2]`` becomes ``x.size(0)``, ``x.size(1)``; ``x.dtype``, ``x.device`` and what is computed
from them alone (``torch.finfo(x.dtype).min``) become the values they have.

transformers 4's fx tracer and plain fx record ``x.size()`` (or ``x.shape``) once and index the tuple;
dynamo records one ``sym_size(x, d)`` per size. A rewrite that moves a value into a region of its own (a
padding-free stack) must tell which sizes of that value the code outside still reads, and can answer for one
size (another input of the region has it) but not for the whole shape. Read per size, the graphs of every
frontend say the same thing. Sizes are the same on every call by construction, so the graph computes what it
did; a tuple still read as a whole (``x.view(*x.size())``) is left as it is. Dtypes and devices are constants of
a graph: a call with inputs of another dtype or device gets a graph of its own, and so do parameters that change
theirs (fxbt/guards.py); dynamo's graphs hold them as constants already.
"""
from __future__ import annotations

import operator

import torch
import torch.fx

from .meta import TensorInfo


_CONSTANT_ATTRS = ("dtype", "device")
_FOLDABLE = (torch.finfo, torch.iinfo)


def as_dynamo_records(gm: torch.fx.GraphModule, keep=frozenset()) -> int:
    """Rewrite each int index into a whole-shape read (through slices too) as ``size(d)``, and fold dtype and
    device reads; return how many reads changed. Nodes in ``keep`` (what a tracer decided on) stay in the graph."""
    count = 0
    for node in list(gm.graph.nodes):
        info = node.args[0].meta.get("fxbt_val") if _whole_shape(node) else None
        if isinstance(info, TensorInfo):
            count += _split(gm, node, node.args[0], tuple(range(info.ndim)), keep)
        elif _constant_read(node) and node not in keep:
            count += _fold(node)
    return count


def _constant_read(node: torch.fx.Node) -> bool:
    """A dtype or device read of a tensor, finfo / iinfo of constants, or an attribute of such a folded value."""
    if node.op != "call_function":
        return False
    if node.target is getattr:
        source = node.args[0]
        if isinstance(source, torch.fx.Node):
            return node.args[1] in _CONSTANT_ATTRS and isinstance(source.meta.get("fxbt_val"), TensorInfo)
        return isinstance(source, _FOLDABLE)
    return node.target in _FOLDABLE and not node.all_input_nodes


def _fold(node: torch.fx.Node) -> int:
    source = node.args[0]
    if node.target is getattr:
        value = getattr(source.meta["fxbt_val"] if isinstance(source, torch.fx.Node) else source, node.args[1])
    else:
        value = node.target(*node.args, **node.kwargs)
    for user in list(node.users):
        user.args = torch.fx.node.map_arg(user.args, lambda a: value if a is node else a)
        user.kwargs = torch.fx.node.map_arg(user.kwargs, lambda a: value if a is node else a)
    node.graph.erase_node(node)
    return 1


def _whole_shape(node: torch.fx.Node) -> bool:
    if node.op == "call_method" and node.target == "size":
        return len(node.args) == 1 and not node.kwargs
    return node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",)


def _split(gm, tuple_node, tensor, dims: tuple, keep) -> int:
    """Replace the int indexes of ``tuple_node`` (the sizes ``dims`` of ``tensor``) by size reads; a tuple no
    longer read goes (a whole-shape read left behind would be a use of ``tensor`` no region can stand in for)."""
    count = 0
    for user in list(tuple_node.users):
        if user.op != "call_function" or user.target is not operator.getitem or user.args[0] is not tuple_node:
            continue
        index = user.args[1]
        if isinstance(index, slice):
            count += _split(gm, user, tensor, dims[index], keep)
        elif isinstance(index, int) and -len(dims) <= index < len(dims):
            # the node itself becomes the read: what the tracer decided on it (``if seq_len > 1``) still names it
            user.op, user.target, user.args = "call_method", "size", (tensor, dims[index])
            count += 1
    if not tuple_node.users and tuple_node not in keep:
        gm.graph.erase_node(tuple_node)
    return count
