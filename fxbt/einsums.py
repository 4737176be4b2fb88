"""Two-operand einsums that are batched matrix products, written out as the permutes and matmul they compute.

``torch.einsum("bqhd,bkhd->bhqk", q, k)`` is Q·Kᵀ with the head axis moved; ``"bhqk,bkhd->bqhd"`` is P·V with
its output permuted. The canonical view already reads an einsum laid out like matmul as one (fxbt/canon.py);
an einsum with any other arrangement of its batch, row, contraction and column axes is written here, before
matching, as ``permute`` → ``matmul`` → ``permute`` nodes, so that attention written this way is recognised
like attention written with transposes. The right operand is written as ``[..., columns, contraction]``
transposed where its axes come in that order (the usual ``k.transpose(-2, -1)``). An ellipsis
(``"... i d, ... j d -> ... i j"``) stands for as many batch axes as the operands' ranks say; such an einsum is
always written out, whatever its layout. einsum computes a pair product the same way (a permute of each operand,
then one batched GEMM), and capture's reproduction check holds the written-out graph to the model's outputs.
"""
from __future__ import annotations

import string

import torch
import torch.fx


def write_out(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Rewrite every einsum of ``gm`` that is a batched matrix product in a layout matmul does not have;
    return the nodes added (they need fake values on dynamo graphs)."""
    added: list[torch.fx.Node] = []
    for node in list(gm.graph.nodes):
        operands = _operands(node)
        plan = _plan(_without_ellipsis(node.args[0], operands), any_layout="..." in node.args[0]) if operands else None
        if plan is None:
            continue
        a_perm, b_perm, transpose, out_perm = plan
        with gm.graph.inserting_before(node):
            a = _permuted(gm.graph, operands[0], a_perm, added)
            b = _permuted(gm.graph, operands[1], b_perm, added)
            if transpose:
                b = gm.graph.call_method("transpose", (b, -2, -1))
                added.append(b)
            out = gm.graph.call_function(torch.matmul, (a, b))
            added.append(out)
            out = _permuted(gm.graph, out, out_perm, added)
        out.meta.update({k: v for k, v in node.meta.items() if k not in ("example_value", "val")})
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
    if added:
        gm.recompile()
    return added


def _operands(node: torch.fx.Node) -> list | None:
    if node.op != "call_function" or node.target is not torch.einsum or node.kwargs or not node.args:
        return None
    operands = list(node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (tuple, list)):
        operands = list(operands[0])
    ok = len(operands) == 2 and all(isinstance(x, torch.fx.Node) for x in operands)
    return operands if ok and isinstance(node.args[0], str) else None


def needs_ranks(gm: torch.fx.GraphModule) -> bool:
    """Some einsum has an ellipsis and an operand whose rank is not recorded yet."""
    return any(_operands(n) and "..." in n.args[0] and any(_rank(x) is None for x in _operands(n))
               for n in gm.graph.nodes)


def _rank(node: torch.fx.Node) -> int | None:
    for key in ("example_value", "val", "fxbt_val"):
        shape = getattr(node.meta.get(key), "shape", None)
        if shape is not None:
            return len(shape)
    return None


def _without_ellipsis(equation: str, operands) -> str | None:
    """The equation (spaces dropped) with each ``...`` spelled out in letters of its own, one per axis it stands
    for; None where the ellipses stand for unequal numbers of axes (broadcast) or a rank is unknown."""
    eq = equation.replace(" ", "")
    if "..." not in eq:
        return eq
    terms = eq.replace("->", ",").split(",")
    if len(terms) != 3 or any(t.count("...") != 1 for t in terms):
        return None
    ranks = [_rank(x) for x in operands]
    if None in ranks:
        return None
    lengths = {rank - len(t.replace("...", "")) for t, rank in zip(terms, ranks)}
    spare = [c for c in string.ascii_letters if c not in eq]
    if len(lengths) != 1 or min(lengths) < 0 or len(spare) < min(lengths):
        return None
    return eq.replace("...", "".join(spare[: lengths.pop()]))


def _plan(eq: str | None, any_layout: bool) -> tuple | None:
    """(left permutation, right permutation, transpose the right?, output permutation), or None where the
    einsum is not one batched matrix product, or is one in matmul's own layout already (unless ``any_layout``:
    an equation whose ellipsis was spelled out, which the canonical view cannot read)."""
    if eq is None:
        return None
    if "->" not in eq or "." in eq or eq.count(",") != 1:
        return None
    lhs, out = eq.split("->")
    a, b = lhs.split(",")
    if any(len(set(s)) != len(s) for s in (a, b, out)):
        return None  # a diagonal or a repeated output axis
    batch = [x for x in out if x in a and x in b]
    rows, cols = [x for x in a if x not in b], [x for x in b if x not in a]
    summed = [x for x in a if x in b and x not in out]
    if len(rows) != 1 or len(cols) != 1 or len(summed) != 1 or set(out) != set(batch + rows + cols):
        return None
    (i,), (j,), (c,) = rows, cols, summed
    a_perm = [a.index(x) for x in batch + [i, c]]
    transpose = b.index(j) < b.index(c)
    b_perm = [b.index(x) for x in batch + ([j, c] if transpose else [c, j])]
    product = batch + [i, j]
    out_perm = [product.index(x) for x in out]
    if all(_identity(p) for p in (a_perm, b_perm, out_perm)) and not any_layout:
        return None  # matmul's layout, the right maybe transposed: the canonical view reads it as it is
    return a_perm, b_perm, transpose, out_perm


def _identity(perm: list[int]) -> bool:
    return perm == list(range(len(perm)))


def _permuted(graph: torch.fx.Graph, x: torch.fx.Node, perm: list[int], added: list) -> torch.fx.Node:
    if _identity(perm):
        return x
    node = graph.call_method("permute", (x, *perm))
    added.append(node)
    return node
