"""Graph scalars that can take one value only: arithmetic on sizes that the model's weights fix.

To a tracer, ``q.size(-1) ** -0.5`` or ``(x.shape[-1] // heads) ** 0.5`` is computed at run time. Yet it
can only ever be one number when every size it reads is fixed by a weight: the last dimension of a
Linear's input is the Linear's in_features, of its output the out_features (a LayerNorm's: its normalized
shape), and a view to fixed sizes keeps them; transposes and shape-preserving ops move or keep them.
`fixed_value` proves that and returns the number the example computed. A size that could change between
calls (batch, sequence length) makes the scalar not fixed.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx

from .canon import TRANSPARENT, Const, _dims, canonical_op
from .meta import TensorInfo, val

_ARITHMETIC = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod, operator.pow,
    operator.neg, math.sqrt, float, int, torch.sym_float, torch.sym_int, torch._sym_sqrt,
}
_SHAPE_METHODS = {"view", "reshape"}
_PIN_LAST_DIM = {"linear", "layer_norm"}  # their weights fix the last dimension of their input and output


def fixed_value(gm: torch.fx.GraphModule, value) -> int | float | None:
    """The one number ``value`` (a constant or a scalar node) can be, or None if it could be another."""
    if isinstance(value, Const):
        value = value.value
    if not isinstance(value, torch.fx.Node):
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    number = val(value)
    if not isinstance(number, (int, float)) or isinstance(number, bool):
        return None
    read = _size_read(value)
    if read is not None:
        return number if _fixed_dim(gm, *read) else None
    if value.op == "call_function" and value.target in _ARITHMETIC:
        operands = [*value.args, *value.kwargs.values()]
        return number if all(fixed_value(gm, a) is not None for a in operands) else None
    return None


def _size_read(node: torch.fx.Node):
    """(tensor, dim) when ``node`` reads one size: ``t.size(d)``, ``t.shape[d]``, ``t.size()[d]``, sym_size."""
    if node.op == "call_method" and node.target == "size":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return (node.args[0], dim) if isinstance(dim, int) else None
    if node.op != "call_function":
        return None
    if node.target is torch.ops.aten.sym_size.int:
        return node.args[0], node.args[1]
    if node.target is operator.getitem and isinstance(node.args[1], int) and _whole_shape(node.args[0]):
        return node.args[0].args[0], node.args[1]
    return None


def _whole_shape(node) -> bool:
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "call_method" and node.target == "size":
        return len(node.args) == 1 and "dim" not in node.kwargs
    return node.op == "call_function" and node.target is getattr and node.args[1] == "shape"


def _fixed_dim(gm: torch.fx.GraphModule, t, dim: int) -> bool:
    info = val(t)
    if not isinstance(t, torch.fx.Node) or not isinstance(info, TensorInfo) or info.ndim == 0:
        return False
    dim %= info.ndim
    canon = canonical_op(t, gm)  # read afresh: earlier rewrites in this pass changed the graph
    if dim == info.ndim - 1 and (canon.op in _PIN_LAST_DIM or any(_pins_input(gm, u, t) for u in t.users)):
        return True
    if canon.op in TRANSPARENT:
        return _fixed_dim(gm, canon.operands[0], dim)
    if canon.op == "transpose":
        a, b = (d % info.ndim for d in canon.attrs["dims"])
        return _fixed_dim(gm, canon.operands[0], {a: b, b: a}.get(dim, dim))
    if canon.op == "permute":
        return _fixed_dim(gm, canon.operands[0], canon.attrs["perm"][dim])
    if canon.op == "reshape" and t.target in _SHAPE_METHODS | {torch.reshape}:
        sizes = _dims(t, t.args[1:]) or tuple(t.kwargs.get("shape", ()))
        return len(sizes) == info.ndim and sizes[dim] != -1 and fixed_value(gm, sizes[dim]) is not None
    return False


def _pins_input(gm, user: torch.fx.Node, t: torch.fx.Node) -> bool:
    canon = canonical_op(user, gm)
    return canon.op in _PIN_LAST_DIM and canon.operands[0] == t
