"""In-place ops on values nothing else can see, written out of place.

``scores.masked_fill_(mask, min)`` (XLM, FlauBERT), ``buckets += offset`` (T5) and ``mask[..., :n] = padded``
(OPT's mask on transformers 4) mutate a tensor that later ops read by the old name: the graph says softmax reads ``scores``, which hides that it reads the masked
scores. Where that tensor is fresh — computed by an op that allocates its result, and no view of it taken
before the write — the write becomes its out-of-place form, and every later reader reads its result. The
values are the same on every call, so the graph still reproduces the model (capture checks it) and unroll gives
this graph back; matching then sees the dataflow as it is.
"""
from __future__ import annotations

import operator

import torch
import torch.fx

from .meta import target_name as _name, writes_in_place

# ops whose result is new memory (a view or the input itself is never returned)
_ALLOCATING = frozenset({
    "matmul", "bmm", "baddbmm", "einsum", "mm", "addmm", "linear", "add", "sub", "mul", "div", "true_divide",
    "truediv", "floor_divide", "where", "masked_fill", "softmax", "log_softmax", "exp", "neg", "pow", "tanh",
    "sigmoid", "rsub", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
    "__rtruediv__", "__neg__", "__pow__", "abs", "log", "sqrt", "rsqrt", "clamp", "minimum", "maximum",
    "zeros", "ones", "full", "arange", "zeros_like", "ones_like", "full_like", "cat", "stack", "clone",
    "layer_norm", "rms_norm", "group_norm", "gelu", "relu", "silu", "embedding",
})  # not dropout: in eval it returns its input
_OUT_OF_PLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                           operator.itruediv: operator.truediv}
_SHAPE_READERS = frozenset({"expand_as", "view_as", "reshape_as", "type_as", "new_zeros", "new_ones", "new_full",
                            "new_empty", "size", "dim"})


def assign(x: torch.Tensor, index, value) -> torch.Tensor:
    """``x[index] = value`` out of place."""
    out = x.clone()
    out[index] = value
    return out


def out_of_place(gm: torch.fx.GraphModule) -> int:
    """Rewrite in place each in-place op on a fresh value; return how many were rewritten."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    count = 0
    for node in list(gm.graph.nodes):
        target = _out_of_place_target(node)
        if target is None or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        written = node.args[0]
        if not _fresh(written) or not all(_unaffected(u, written, node, order) for u in written.users):
            continue
        for user in [u for u in written.users if order[u] > order[node]]:
            user.replace_input_with(written, node)
        node.target = target
        if target is assign:  # it returned None; now the written tensor, whose fake value dynamo recorded
            node.op = "call_function"
            node.meta["example_value"] = written.meta.get("example_value")
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def _out_of_place_target(node: torch.fx.Node):
    if node.op == "call_method":
        name = node.target
        if name.endswith("_") and not name.startswith("_") and hasattr(torch.Tensor, name[:-1]):
            return name[:-1]
        return None
    if node.op == "call_function" and node.target in _OUT_OF_PLACE_OPERATORS:
        return _OUT_OF_PLACE_OPERATORS[node.target]
    if node.op == "call_function" and node.target is operator.setitem and len(node.args) == 3 and not node.users:
        return assign
    return None


def _fresh(node: torch.fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and _name(node) in _ALLOCATING and "out" not in node.kwargs


def _unaffected(user: torch.fx.Node, written: torch.fx.Node, write: torch.fx.Node, order: dict) -> bool:
    """A reader of the written tensor that the rewrite keeps right: the write itself, a later reader (it will
    read the result), or an earlier one that computed a new value or read only its shape (no view left to
    see the write)."""
    if user is write or order[user] > order[write]:
        return True
    if _name(user) in _SHAPE_READERS and user.args and user.args[0] is not written:
        return True  # ``mask.expand_as(scores)``: the result views ``mask``
    if _fresh(user) or _name(user) in ("size", "dim") or (
            user.op == "call_function" and user.target is getattr and user.args[1] in ("shape", "dtype", "device")):
        return True
    # a view (or anything else) read only before the write, by readers that are themselves unaffected
    return user.op in ("call_function", "call_method") and not writes_in_place(user) and \
        all(order[u] < order[write] and _unaffected(u, user, write, order) for u in user.users)
