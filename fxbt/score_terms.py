"""Score terms an attention computes from the stack's own values, for padding-free stacks.

DeBERTa adds to Q·Kᵀ a relative-position term computed from Q and K themselves: ``bmm(q, pos_kᵀ)`` gathered by
relative position (content to position), and the same from K transposed (position to content). Such a term is
part of the attention's mask, which a padding-free stack computes on the padded grid; but it reads values the
stack holds packed. Its nodes — the term's *island* — run inside the packed graph on those values padded again
(zeros at padded positions), and the attention restricts the term to each sequence's real tokens like any mask.

That is exact when every entry of the term at a real (query, key) pair reads only real positions of the padded
values. `check` proves it over the island by following, for every axis of every value, what that axis indexes
(`_Labels`): ``B`` the batch (or batch·heads), ``T`` a token — the entry depends on the token at that index
along that axis — or nothing. A product contracts only unlabelled axes, a gather gathers along an unlabelled
axis with an index computed from sizes alone, element-wise ops combine labels axis by axis; anything else is
not followed, and the island is declined. The term given to the attention must hold tokens only on its query
and key axes.
"""
from __future__ import annotations

import torch
import torch.fx

from .canon import canonical_op
from .meta import ancestors, is_size_query, target_name as _name
from .shapes import sym

_POINTWISE = frozenset({"add", "sub", "mul", "div", "truediv", "neg", "to", "type_as", "float", "contiguous",
                        "clone", "dropout", "clamp", "__add__", "__radd__", "__sub__", "__mul__", "__rmul__",
                        "__truediv__", "__neg__", "iadd", "add_", "sqrt", "rsqrt", "exp", "tanh", "where",
                        "masked_fill"})
_PRODUCTS = frozenset({"bmm", "matmul", "__matmul__"})
_SWAPS = frozenset({"transpose", "swapaxes"})


def island(term: torch.fx.Node, carries_tokens) -> set:
    """The nodes of ``term`` that depend on a value carrying tokens (``carries_tokens(node)``): what must be
    computed from the stack's values. Empty when the term does not depend on any."""
    found = set()
    for node in _in_order(term.graph, ancestors([term])):  # sizes read off the stack's values are the region's to answer
        if node.op in ("call_function", "call_method") and not node.meta.get("fxbt_shape_only") and \
                not is_size_query(node) and any(a in found or carries_tokens(a) for a in node.all_input_nodes):
            found.add(node)
    return found


def check(gm, nodes: set, entries: dict, term: torch.fx.Node, scores_rank: int, heads_axis: int | None) -> str | None:
    """None when ``term`` (the output of island ``nodes``) holds tokens only on its query and key axes, given the
    labels of the values the island reads (``entries``: node -> labels); else why not."""
    labels = dict(entries)
    for node in _in_order(term.graph, nodes):
        found = _labels(gm, node, labels)
        if isinstance(found, str):
            return f"its score term reads the stack's values through {node.name}: {found}"
        labels[node] = found
    out = labels[term]
    if len(out) > scores_rank:
        return "its score term has more axes than the scores"
    aligned = (None,) * (scores_rank - len(out)) + tuple(out)
    if any(label == "T" for label in aligned[:-2]) or (heads_axis is not None and aligned[heads_axis] is not None):
        return "its score term holds tokens on an axis other than the queries' and keys'"
    if any(label == "B" for label in aligned[-2:]):
        return "its score term holds the batch on the query or key axis"
    return None


def _labels(gm, node, labels: dict):
    name = _name(node)
    args = [a for a in node.args]
    tensors = [a for a in node.all_input_nodes if isinstance(sym(a), tuple)]
    of = lambda a: labels.get(a, (None,) * len(sym(a))) if isinstance(a, torch.fx.Node) else ()  # noqa: E731
    if name in _PRODUCTS:
        a, b = of(args[0]), of(args[1])
        if len(a) < 2 or len(b) < 2:
            return "a product with a vector"
        if a[-1] is not None or b[-2] is not None:
            return "a product over a token axis"
        batch = _broadcast(a[:-2], b[:-2])
        return batch if isinstance(batch, str) else batch + (a[-2], b[-1])
    if name in _SWAPS or canonical_op(node, gm).op == "transpose" and len(args) == 3:
        x = list(of(args[0]))
        i, j = (d % len(x) for d in args[1:3])
        x[i], x[j] = x[j], x[i]
        return tuple(x)
    if name == "permute":
        x = of(args[0])
        dims = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
        return tuple(x[d % len(x)] for d in dims)
    if name == "gather":
        x, dim = of(args[0]), node.kwargs.get("dim", args[1] if len(args) > 1 else None)
        index = node.kwargs.get("index", args[2] if len(args) > 2 else None)
        if not isinstance(dim, int) or not isinstance(index, torch.fx.Node) or any(of(index)):
            return "a gather by an index that is not computed from sizes alone"
        return x if x[dim % len(x)] is None else "a gather along a token axis"
    if name == "einsum":
        return _einsum(node, of)
    if name == "unsqueeze":
        x = list(of(args[0]))
        d = args[1] % (len(x) + 1)
        return tuple(x[:d] + [None] + x[d:])
    if name in _POINTWISE:
        return _broadcast(*(of(t) for t in tensors)) if tensors else "no tensor operand"
    if not any(any(of(t)) for t in tensors):  # computed from unlabelled values only: no token read
        rank = len(sym(node)) if isinstance(sym(node), tuple) else 0
        return (None,) * rank
    return f"{name} is not followed"


def _einsum(node, of):
    """BERT's relative_key term ``einsum("bhld,lrd->bhlr", q, distances)``: each output axis takes the labels of the
    operand axes of its letter; a letter summed over must index nothing."""
    equation, operands = node.args[0], node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    if not isinstance(equation, str) or "..." in equation or "->" not in equation:
        return "an einsum without an explicit output"
    inputs, output = equation.replace(" ", "").split("->")
    by_letter: dict = {}
    for letters, operand in zip(inputs.split(","), operands):
        labels = of(operand) if isinstance(operand, torch.fx.Node) else ()
        if len(labels) != len(letters):
            return "an einsum operand of another rank"
        for letter, label in zip(letters, labels):
            by_letter.setdefault(letter, set()).add(label)
    if any(by_letter[c] - {None} for c in by_letter if c not in output):
        return "an einsum summing over a token axis"
    out = []
    for letter in output:
        found = by_letter.get(letter, {None}) - {None}
        if len(found) > 1:
            return "an einsum joining a token axis with a batch axis"
        out.append(found.pop() if found else None)
    return tuple(out)


def _in_order(graph, nodes) -> list:
    return [n for n in graph.nodes if n in nodes]


def _broadcast(*shapes) -> tuple | str:
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for i in range(rank):
        found = {s[i - rank + len(s)] for s in shapes if i - rank + len(s) >= 0} - {None}
        if len(found) > 1:
            return "an element-wise op joins a token axis with a batch axis"
        out.append(found.pop() if found else None)
    return tuple(out)
