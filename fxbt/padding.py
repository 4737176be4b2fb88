"""Padding removal as a graph pass: which nodes can run on packed tokens, and the graph that runs them.

Starting from an attention (a region the attention pass made), `token_region` grows the set of nodes that
carry the [batch, sequence] axes of its queries and compute every (batch, position) of their output from the
same (batch, position) of their inputs: linears, norms of any kind, activations, residuals, elementwise ops
whose other operands broadcast over the token axes or are per-position tables (rotary cos/sin, position
embeddings, token-type embeddings), layout ops that keep the two axes apart, embeddings of token ids, and
attention itself, which runs per sequence. What would read the padded positions of a value leaving the
region (a convolution over the sequence, a shift, pooling) takes back into the original computation every
node that value's padded positions depend on (fxbt/tokens.py).

`packed_graph` writes the region again on packed tensors ([T] followed by the other axes, T real tokens):
the model's own ops, with dims, indices and view sizes translated; attention becomes per-sequence attention;
values entering are packed, values leaving are unpacked (zeros at padded positions). No block is
re-implemented, so every norm, activation and position scheme a model uses runs as the model wrote it.
"""
from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import sympy
import torch
import torch.fx

from . import packing, score_terms
from .canon import canonical_op
from .meta import TensorInfo, ancestors, deterministic, is_size_query, target_name as _name
from .region import boundary, metadata_stand_in, reads_metadata_only
from .serialize import make_picklable
from .shapes import is_static, same, sym
from .tokens import POSITIONWISE, blanking, padded_reads
from .values import ValueKeys

# ops computed position by position, named as their targets (beyond the canonical view's POSITIONWISE)
_POINTWISE_NAMES = frozenset({
    "add", "sub", "mul", "div", "truediv", "true_divide", "pow", "neg", "abs", "exp", "log", "sqrt", "rsqrt",
    "erf", "erfc", "tanh", "sigmoid", "relu", "gelu", "silu", "mish", "softplus", "elu", "leaky_relu",
    "hardswish", "hardsigmoid", "sin", "cos", "clamp", "clip", "where", "masked_fill", "reciprocal", "square",
    "sign", "floor", "ceil", "round", "minimum", "maximum", "dropout", "float", "half", "bfloat16", "double",
    "int", "long", "bool", "to", "type", "type_as", "contiguous", "clone", "detach", "iadd", "imul", "isub",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
    "__pow__", "__rpow__", "__neg__", "add_", "mul_", "sub_", "div_", "lerp", "addcmul", "nan_to_num",
    "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not", "and_", "or_", "invert",
    "__and__", "__or__", "__invert__", "alpha_dropout", "feature_alpha_dropout", "silu_", "relu_", "gelu_",
})
_LAST_DIM = frozenset({"linear", "layer_norm", "rms_norm", "softmax", "log_softmax", "mean", "sum", "amax",
                       "amin", "var", "std", "norm", "logsumexp"})
_LAYOUT = frozenset({"transpose", "permute", "unsqueeze", "squeeze", "expand", "broadcast_to", "t"})
_VIEW = frozenset({"view", "reshape", "view_as", "reshape_as", "flatten", "unflatten"})
_SPLIT = frozenset({"chunk", "split", "unbind"})
_JOIN = frozenset({"cat", "concat", "concatenate", "stack"})
_MODULES = (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Dropout, torch.nn.GELU, torch.nn.ReLU, torch.nn.Tanh,
            torch.nn.SiLU, torch.nn.Identity, torch.nn.Sigmoid, torch.nn.Mish, torch.nn.Hardswish, torch.nn.ELU,
            torch.nn.Softplus, torch.nn.LeakyReLU, torch.nn.Embedding, torch.nn.RMSNorm)


class Axes(tuple):
    """Where a value's token axes are: (batch axis, sequence axis). The same axis twice: one axis holds
    batch·sequence, batch outer (GPT-2's linears on [b·s, e]). ``heads`` > 1: the batch axis holds batch·heads,
    batch outer (the bmm layout [b·h, s, d]); the packed form keeps an axis of size ``heads`` in its place."""

    heads: int

    def __new__(cls, b: int, s: int, heads: int = 1):
        axes = super().__new__(cls, (b, s))
        axes.heads = heads
        return axes

    def __eq__(self, other):  # never equal to None or a non-tuple (tuple.__eq__ would answer NotImplemented)
        return isinstance(other, tuple) and tuple.__eq__(self, other) and getattr(other, "heads", 1) == self.heads

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash((tuple(self), self.heads))

    @property
    def dropped(self) -> frozenset:
        """The padded axes the packed form has no axis for."""
        return frozenset({self[1]} if self.heads > 1 else {self[0], self[1]})


@dataclass
class Region:
    """Nodes that run on packed tokens, for one pair of token axes."""

    batch: Any  # the symbolic batch size
    seq: Any  # the symbolic sequence length
    nodes: set = field(default_factory=set)
    attentions: list = field(default_factory=list)  # attention region call nodes, in graph order
    reads: set = field(default_factory=set)  # sequence positions read after the region by a fixed index
    key_readers: set = field(default_factory=set)  # attention calls after the region reading it as keys/values
    gathers: set = field(default_factory=set)  # (batch, sequence) index nodes picking positions after the region
    factors: set = field(default_factory=set)  # (node, token axes, "zero"/"fill") blanking its padded positions after
    why_not: dict = field(default_factory=dict)  # node -> why it stays out (for the report)
    islands: dict = field(default_factory=dict)  # score term node -> its island (fxbt/score_terms.py)

    @property
    def island_nodes(self) -> set:
        """Nodes computed inside the packed graph on padded values: the score terms' islands."""
        return set().union(*self.islands.values()) if self.islands else set()

    def axes(self, node) -> Axes | None:
        """Where the token axes are in ``node``'s shape, when each appears exactly once (`Axes`). Which order a
        merged axis holds its factors in is not in the shape: the ops that make one prove it (`_segments`)."""
        shape = sym(node)
        if not isinstance(shape, tuple):
            return None
        if shape and all(isinstance(part, tuple) for part in shape):  # the parts of a split: where they all agree
            parts = {self._axes_of(part) for part in shape}
            return parts.pop() if len(parts) == 1 else None
        return self._axes_of(shape)

    def _axes_of(self, shape) -> Axes | None:
        found = []
        for size in (self.batch, self.seq):
            hits = [i for i, s in enumerate(shape) if same(s, size)]
            if len(hits) != 1:
                return self._merged(shape) if not hits else None
            found.append(hits[0])
        return Axes(found[0], found[1])

    def _merged(self, shape) -> Axes | None:
        hits = [i for i, s in enumerate(shape) if same(s, self.batch * self.seq)]
        if any(same(s, self.batch) for s in shape):
            return None
        if len(hits) == 1 and not any(same(s, self.seq) for s in shape):
            return Axes(hits[0], hits[0])
        seq = [i for i, s in enumerate(shape) if same(s, self.seq)]
        heads = [(i, split[0]) for i, split in enumerate(map(_multiple, shape))
                 if split and same(split[1], self.batch)]
        if hits or len(seq) != 1 or len(heads) != 1:
            return None
        return Axes(heads[0][0], seq[0], heads[0][1])


def _multiple(size) -> tuple | None:
    """(n, rest) where ``size`` is n·rest for every admitted size, n an integer > 1 and rest symbolic (a static
    size proves nothing: any multiple of the batch could be one). Cheap: asked of every axis a region looks at."""
    if is_static(size):
        return None
    factor, rest = sympy.sympify(size).as_coeff_Mul()
    return (int(factor), rest) if factor.is_Integer and factor > 1 and not is_static(rest) else None


def token_region(gm: torch.fx.GraphModule, attention: torch.fx.Node) -> Region | str:
    """The nodes around ``attention`` (an attention region's call) that can run on packed tokens."""
    q = _attention_operand(gm, attention, "q")
    grid = _query_grid(sym(q) if q is not None else None)
    if grid is None:
        return "its queries are not [batch, heads, sequence, head dim] or [batch·heads, sequence, head dim]"
    region = Region(*grid)
    if not _attention_layout(region.axes(q), len(sym(q))):
        return "the batch and sequence sizes of its queries are not two sizes apart from the others"
    region.nodes = _connected(gm, attention, region)
    _find_islands(gm, region)
    while True:
        while _prune(gm, region) | _prune_padded_reads(gm, region) | _prune_reentry(region):
            pass
        if not _drop_unproven_islands(gm, region):
            break
    region.attentions = [n for n in gm.graph.nodes if n in region.nodes and is_attention(gm, n)]
    if attention not in region.nodes:
        return region.why_not.get(attention, "it cannot run on packed tokens")
    if runs_padded(gm, attention, region):  # its mask names its keys' padding, not its queries'
        return "a cross-attention: its keys are another sequence's tokens; it runs inside its queries' stack"
    _add_size_queries(region)
    return region


def _query_grid(shape) -> tuple | None:
    """(batch, sequence) of an attention's queries: [b, h, s, d], or [b·h, s, d] with a symbolic batch (the
    batch is the size's symbolic factor; `Region.axes` then proves the layout)."""
    if not isinstance(shape, tuple) or len(shape) not in (3, 4):
        return None
    if len(shape) == 4:
        return shape[0], shape[2]
    split = _multiple(shape[0])
    return (split[1], shape[1]) if split else None


def _attention_layout(axes, rank: int, transposed: bool = False) -> bool:
    """An attention operand's token axes: [batch, heads, sequence, head dim] or [batch·heads, sequence, head
    dim]; the sequence last for keys stored transposed."""
    if axes is None or axes[0] != 0 or axes[1] != rank - (1 if transposed else 2):
        return False
    return rank == 4 and axes.heads == 1 or rank == 3 and axes.heads > 1


# --- growing ------------------------------------------------------------------------------------------


def _connected(gm, seed, region: Region) -> set:
    """Token-carrying nodes of a supported kind connected to ``seed`` through such nodes."""
    found, frontier = set(), [seed]
    while frontier:
        node = frontier.pop()
        if node in found:
            continue
        why = _syntactic(gm, node, region)
        if why:
            region.why_not[node] = why
            continue
        found.add(node)
        frontier.extend(node.all_input_nodes)
        frontier.extend(node.users)
    return found


def _syntactic(gm, node, region: Region) -> str | None:
    """None when ``node`` carries the token axes and is of a kind that can run packed."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return "not an operation"
    if region.axes(node) is None and not is_attention(gm, node):
        return "does not carry the batch and sequence axes"
    if _kind(gm, node) is None:
        return f"{_name(node)} has no packed form"
    if any(is_attention(gm, u) and node not in [_attention_operand(gm, u, n) for n in ("q", "k", "v")]
           for u in node.users):
        return "it is part of an attention's mask, which the padded call computes"
    return None


def _kind(gm, node) -> str | None:
    if is_attention(gm, node):
        return "attention"
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, torch.nn.Embedding):
            return "embedding"
        return "last_dim" if isinstance(module, _MODULES) else None
    name = _name(node)
    canon = canonical_op(node, gm).op
    if name == "embedding":
        return "embedding"
    if name in _VIEW or canon == "reshape" and name not in ("squeeze", "unsqueeze"):
        return "view"
    if name in _LAYOUT or canon in ("transpose", "permute"):
        return "layout"
    if name == "getitem":
        return "getitem"
    if name in _SPLIT:
        return "split"
    if name in _JOIN:
        return "join"
    if canon == "linear" or name in _LAST_DIM or canon in ("layer_norm", "softmax"):
        return "last_dim"
    if name in ("matmul", "__matmul__") or canon == "matmul":
        return "matmul"
    if canon in POSITIONWISE or name in _POINTWISE_NAMES:
        return "pointwise"
    return None


# --- score terms computed from the region's values -------------------------------------------------------


def _find_islands(gm, region: Region) -> None:
    """The additive score terms of the region's attentions computed from its values (DeBERTa's relative
    positions from Q and K): their nodes leave the region and run padded inside the packed graph."""
    for node in [n for n in region.nodes if is_attention(gm, n)]:
        operands = ancestors([_attention_operand(gm, node, n) for n in ("q", "k", "v")])
        for term in _additive_terms(gm, node):
            found = score_terms.island(term, lambda a: a in region.nodes) - operands
            if term in found:
                region.islands[term] = found
                region.nodes -= found


def _drop_unproven_islands(gm, region: Region) -> bool:
    """Drop islands whose attention left the region or whose term reads the region's values in a way not proven
    exact (`score_terms.check`); their nodes are then outside nodes like any other. True if any was dropped."""
    dropped = False
    for term, nodes in list(region.islands.items()):
        readers = [u for u in term.users if u in region.nodes and is_attention(gm, u)]
        why = "its attention left the region" if not readers else _island_check(gm, region, nodes, term, readers[0])
        if why:
            del region.islands[term]
            region.why_not.update({term: why, **{reader: why for reader in readers}})
            dropped = True
    return dropped


def _island_check(gm, region: Region, nodes: set, term, attention) -> str | None:
    entries = {}
    for node in nodes:
        for a in node.all_input_nodes:
            if a in region.nodes and _is_tensor(a) and a not in entries:
                axes = region.axes(a)
                if axes is None or _is_merged(axes):
                    return f"its score term reads {a.name}, whose token axes are not told apart"
                labels = [None] * len(sym(a))
                labels[axes[0]], labels[axes[1]] = "B", "T"
                entries[a] = tuple(labels)
    q = _attention_operand(gm, attention, "q")
    rank = len(sym(q))
    return score_terms.check(gm, nodes, entries, term, rank, 1 if rank == 4 else None)


def _additive_terms(gm, attention) -> list:
    """The mask terms of an attention region that are only added to the scores (a bias, never a mask)."""
    module = gm.get_submodule(attention.target)
    program = module.params.get("program")
    slot = module.slots.get("mask_terms")
    if program is None or slot is None or not slot.many:
        return []
    terms = slot.args_of(attention)
    uses = {}
    for step in program:
        for ref in step[1:]:
            for r in (ref if isinstance(ref, tuple) and ref and ref[0] != "term" else (ref,)):
                if isinstance(r, tuple) and r and r[0] == "term":
                    uses.setdefault(r[1], set()).add(step[0])
    return [t for i, t in enumerate(terms) if isinstance(t, torch.fx.Node) and uses.get(i, set()) <= {"add", "sub"}
            and uses.get(i)]


# --- pruning ----------------------------------------------------------------------------------------------


def _prune(gm, region: Region) -> bool:
    """Drop nodes whose operands do not fit their packed form; True if any was dropped."""
    dropped = False
    for node in _in_order(gm, region.nodes):
        if node not in region.nodes:
            continue
        why = _fits(gm, node, region)
        if why:
            region.nodes.discard(node)
            region.why_not[node] = why
            dropped = True
    return dropped


def _fits(gm, node, region: Region) -> str | None:
    kind = _kind(gm, node)
    out = region.axes(node)
    inside = [a for a in node.all_input_nodes if a in region.nodes]
    outside_tokens = [a for a in node.all_input_nodes if a not in region.nodes and _carries_tokens(a, region)]
    if kind == "attention":
        return _attention_fits(gm, node, region)
    entering = kind in ("embedding", "pointwise", "last_dim") and outside_tokens  # packed as it enters the region
    if not inside and not entering:
        return "no operand runs on packed tokens"
    first = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
    if kind in ("last_dim", "matmul"):
        first = _data_operand(gm, node)
        if first not in region.nodes and not (kind == "last_dim" and outside_tokens == [first] and not inside and
                                              _alignable(first, node, region)):
            return "its input does not run on packed tokens"
        if len(inside) + len(outside_tokens) > 1:
            return "it mixes two values with token axes"
        rank = len(sym(first))
        return "it works over the sequence axis" if rank - 1 in region.axes(first) or out != region.axes(first) \
            else (_last_dim_only(node) if kind == "last_dim" else None)
    if kind == "pointwise":
        for operand in node.all_input_nodes:
            if operand in region.nodes and (region.axes(operand) != out or len(sym(operand)) != len(sym(node))):
                return "its operands hold the token axes in other places"
            if operand not in region.nodes and _is_tensor(operand) and not _alignable(operand, node, region):
                return f"operand {operand.name} does not broadcast over the token axes"
        return None
    if kind == "embedding":
        ids = node.args[0]
        return None if ids in region.nodes or _alignable(ids, node, region, drop_last=True) else \
            "its token ids do not run on packed tokens"
    if kind == "join" and (part := _only_part(node)) is not None:  # a cat with empty tensors (an empty KV cache)
        return None if part in region.nodes and region.axes(part) == out else "its input does not run on packed tokens"
    if kind == "join":
        first = _join_inputs(node)[0]
    if kind == "view" and _name(node) in ("view_as", "reshape_as"):
        inside = [a for a in inside if a is not node.args[1]]  # read for its shape only
    if first not in region.nodes or len(inside) > 1 and kind != "join":
        return "its input does not run on packed tokens"
    if kind == "view":
        return None if _segments(sym(first), region.axes(first), sym(node), out) else \
            "it reshapes across the batch or sequence axis"
    if _is_merged(out) or _is_merged(region.axes(first)):
        return "it moves a merged batch·sequence axis"  # layout ops, splits, joins and indexing keep them apart
    if kind == "getitem":
        return _getitem_fits(node, region)
    if kind == "split" and any(u not in region.nodes for u in node.users):
        return "its parts are read outside the region"  # a tuple of packed values cannot be padded again
    if kind in ("layout", "split"):
        return _dims_fit(node, region)
    if kind == "join":
        return None if all(a in region.nodes for a in _join_inputs(node)) and _dims_fit(node, region) is None \
            else "it joins values that do not all run on packed tokens"
    return "no packed form"


def _attention_fits(gm, node, region: Region) -> str | None:
    if runs_padded(gm, node, region):
        return None
    transposed = bool(gm.get_submodule(node.target).params.get("k_transposed"))
    ranks = set()
    for name in ("q", "k", "v"):
        operand = _attention_operand(gm, node, name)
        if operand not in region.nodes or not _attention_layout(region.axes(operand), len(sym(operand)),
                                                                 transposed and name == "k"):
            return f"its {'queries' if name == 'q' else 'keys' if name == 'k' else 'values'} do not run on " \
                   "packed tokens"
        ranks.add(len(sym(operand)))
    return None if len(ranks) == 1 else "its queries, keys and values merge the heads differently"


def runs_padded(gm, node, region: Region) -> bool:
    """A cross-attention: queries on the region's tokens, everything else it reads (keys, values, mask) from
    outside the region and computed without it (an encoder's output and mask). It runs as the model's attention
    on its queries padded again: each output row is computed from its own query row, so the rows of padded
    queries are dropped when its output is packed again, whatever the keys' sequence is."""
    q = _attention_operand(gm, node, "q")
    if q not in region.nodes:
        return False
    axes = region.axes(q)
    if axes is None or axes.heads != 1 or not _attention_layout(axes, len(sym(q))) or region.axes(node) != axes:
        return False
    return all(a not in region.nodes and not _ancestors_in(a, region) for a in node.all_input_nodes if a is not q)


def _last_dim_only(node) -> str | None:
    """softmax and reductions: only over the last axis."""
    name = _name(node)
    if name in ("softmax", "log_softmax", "mean", "sum", "amax", "amin", "var", "std", "norm", "logsumexp"):
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        rank = len(sym(node.args[0]))
        dims = dim if isinstance(dim, (list, tuple)) else (dim,)
        if not all(isinstance(d, int) and d % rank == rank - 1 for d in dims):
            return "it reduces over another axis than the last"
    return None


def _getitem_fits(node, region: Region) -> str | None:
    if _is_parts(node.args[0]):
        return None if isinstance(node.args[1], int) else "it indexes a split with a computed index"
    index = _full_index(node.args[1], len(sym(node.args[0])))
    if index is None:
        return "it indexes with tensors or several ellipses"
    b, s = region.axes(node.args[0])
    consumed = [i for i in index if i is not None]
    if not _whole(consumed[b]) or not _whole(consumed[s]):
        return "it indexes the batch or sequence axis"
    return None


def _whole(index) -> bool:
    """An index that takes a whole axis: ``:``, ``0:``, ``::1``."""
    return isinstance(index, slice) and index.start in (None, 0) and index.stop is None and index.step in (None, 1)


def _dims_fit(node, region: Region) -> str | None:
    """Layout, split and join ops: the dims they name are not token axes (checked on the translation)."""
    try:
        _translate_dims(node, region)
    except _NoPackedForm as e:
        return str(e)
    return None


def _prune_padded_reads(gm, region: Region) -> bool:
    """A value leaving the region whose padded positions something reads across positions: take back every
    node its padded positions depend on (an attention's through its queries only: its keys are masked)."""
    region.reads, region.key_readers, region.gathers, region.factors = set(), set(), set(), set()
    islands = region.island_nodes
    leaving = [n for n in _in_order(gm, region.nodes) if _is_tensor(n) and any(
        u not in region.nodes and u not in islands and not is_size_query(u) for u in n.users)]
    blanks = {n: b for n in leaving if (b := _blanked_inside(gm, n, region)) is not None}
    for node, (_, kind, written_apart) in blanks.items():  # first: blanking that must run after the region
        if kind == "fill" or not written_apart:
            # the original fills padded positions with its value, or the factor as written reads the stack (its
            # sizes: ``mask.expand_as(hidden)``): the product or fill runs after the region
            region.nodes.discard(node)
            region.why_not[node] = "it blanks the padded positions of what leaves the region: it runs after it"
            return True
    for node in leaving:  # every change below returns at once: the region is as it was when these were found
        axes = region.axes(node)
        if axes is None:  # an attention's output whose sizes do not name the token axes: what reads it is unknown
            region.nodes.discard(node)
            region.why_not[node] = "its output's batch and sequence axes cannot be told apart"
            return True
        if axes.heads > 1:  # which batch·heads order it leaves in is proven inside the region only
            region.nodes.discard(node)
            region.why_not[node] = "it leaves the region with the heads merged into its batch axis"
            return True
        blank = blanks.get(node)
        if blank is not None and _take_out_factors(region, [blank[0]]):
            return True
        if blank is not None:  # zero at padded positions, in the original too
            region.factors.add((blank[0], tuple(axes), "zero"))
            continue
        reads = padded_reads(gm, node, frozenset(region.nodes | islands), axes=axes, gathers=True, factors=True)
        late = next((f for f, _, _ in reads.factors if not _apart(gm, f, node)), None)
        if late is not None and not reads.mixes:
            reads.mixes = f"{late.name}, which blanks its padded positions, is computed from the stack's values"
        if not reads.mixes and _take_out_factors(region, [f for f, _, _ in reads.factors]):
            return True
        picking = set().union(*(_ancestors_in(index, region) for pair in reads.gathers for index in pair))
        if picking:  # indices computed inside: computed outside instead (token ids), or the region shrinks
            for taken in picking:
                region.nodes.discard(taken)
                region.why_not[taken] = "it computes positions picked after the region"
            return True
        if reads.mixes:
            for taken in _padded_cone(gm, node, region):
                region.nodes.discard(taken)
                region.why_not[taken] = f"padded positions reach {reads.mixes}"
            return True
        region.reads |= set(reads.positions)
        region.key_readers |= {reader for reader, _ in reads.attention}  # each checks its own mask per call
        region.gathers |= set(reads.gathers)  # computed per call, like fixed positions
        region.factors |= set(reads.factors)  # the region checks per call that they blank its padded positions
    return False


def _blanked_inside(gm, node, region: Region):
    """(factor, kind, written apart) where ``node``, in the region, multiplies a region value by a factor computed
    apart from it (or fills it under such a condition): see `blanking`. ``written apart``: the operand as written,
    before its broadcasts and casts, is computed apart from the stack too."""
    values = [a for a in node.args[:2] if isinstance(a, torch.fx.Node) and a in region.nodes]
    for value in values:
        axes = region.axes(value)
        blank = blanking(gm, node, value, tuple(axes)) if axes is not None and axes.heads == 1 else None
        if blank is not None and _apart(gm, blank[0], value):
            operand = node.args[1] if node.args[0] is value else node.args[0]
            return (*blank, _apart(gm, operand, value))
    return None


def _apart(gm, factor: torch.fx.Node, value: torch.fx.Node) -> bool:
    """``factor`` is computed before any attention, from the graph's inputs and weights, not from ``value``, by ops
    that can move before the region (the region checks it per call, so it takes it as an input)."""
    return not any(n is value or is_attention(gm, n) or _name(n).endswith("_") for n in cone(factor))


def _take_out_factors(region: Region, factors) -> bool:
    """Factors computed inside the region (before its first attention) are computed before it instead."""
    inside = {n for factor in factors for n in cone(factor) if n in region.nodes}
    for n in inside:
        region.nodes.discard(n)
        region.why_not[n] = "it computes a factor that blanks padded positions after the region"
    return bool(inside)


def cone(node: torch.fx.Node) -> list:
    """``node`` and the nodes it is computed from, placeholders and weights excluded, in graph order."""
    found = {n for n in ancestors([node]) if n.op not in ("placeholder", "get_attr")}
    return [n for n in node.graph.nodes if n in found]


def _ancestors_in(node, region: Region) -> set:
    """The region nodes ``node`` is computed from; not through a size of one that an input of the region has
    too (``arange(hidden.shape[0])`` picking rows: installing the region makes it read that input's)."""
    found, seen, frontier, inputs = set(), set(), [node], None
    while frontier:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in region.nodes:
            found.add(n)
        for a in n.all_input_nodes:
            if a in region.nodes and reads_metadata_only(n, a):
                inputs = _inputs(region) if inputs is None else inputs
                if _served_by_input(n, a, region, inputs):
                    continue
            frontier.append(a)
    return found


def _padded_cone(gm, node, region: Region) -> set:
    cone, frontier = set(), [node]
    while frontier:
        n = frontier.pop()
        if n in cone or n not in region.nodes:
            continue
        cone.add(n)
        if is_attention(gm, n):
            frontier.append(_attention_operand(gm, n, "q"))
        else:
            frontier.extend(n.all_input_nodes)
    return cone


def _prune_reentry(region: Region) -> bool:
    """A region runs as one call: no path may leave it and come back. Drop what such a path reaches. Size
    queries of its values, and arithmetic on them, join it at the end (`_add_size_queries`): no path leaves there."""
    inputs = _inputs(region)
    inside = region.nodes | _size_computations(region, inputs) | region.island_nodes
    later = set()
    for node in inside:
        for user in node.users:
            if user not in inside and not _served_by_input(user, node, region, inputs):
                later |= _downstream_outside(user, inside)
    reentered = {n for n in region.nodes if any(a in later for a in n.all_input_nodes)}
    if not reentered:
        return False
    for node in reentered:
        region.nodes.discard(node)
        region.why_not.setdefault(node, "it reads a value computed from the region outside it")
    return True


def _inputs(region: Region) -> list:
    return boundary(region.nodes, next(iter(region.nodes)).graph) if region.nodes else []


def _served_by_input(user, node, region: Region, inputs) -> bool:
    """``user`` reads one size (or the dtype) of region node ``node`` that an input of the region has too."""
    return node in region.nodes and reads_metadata_only(user, node) and \
        metadata_stand_in(user, node, inputs) is not None


def _downstream_outside(node, inside: set) -> set:
    found, frontier = set(), [node]
    while frontier:
        n = frontier.pop()
        if n in found or n in inside:
            continue
        found.add(n)
        frontier.extend(n.users)
    return found


def _add_size_queries(region: Region) -> None:
    """Size queries of region values, and arithmetic on them that only the region reads: computed inside."""
    region.nodes |= _size_computations(region)


def _size_computations(region: Region, inputs=None) -> set:
    """The size queries of region values and the arithmetic on them that only the region reads. A size an input
    of the region also has stays outside: installing the region makes it read that input (`rewire`)."""
    nodes = set(region.nodes)
    inputs = _inputs(region) if inputs is None else inputs
    changed = True
    while changed:
        changed = False
        for node in list(nodes):
            for user in node.users:
                if user in nodes or _is_tensor(user) or _served_by_input(user, node, region, inputs):
                    continue
                if is_size_query(user) or (user.op == "call_function" and all(
                        a in nodes or not _is_tensor(a) and a.op != "placeholder"
                        for a in user.all_input_nodes) and all(u in nodes or not _is_tensor(u)
                                                                for u in user.users)):
                    nodes.add(user)
                    changed = True
    return nodes - region.nodes


# --- the packed graph ------------------------------------------------------------------------------------


class _NoPackedForm(ValueError):
    pass


@dataclass
class Packed:
    """What `packed_graph` made: the graph, the values it reads and the values it gives back."""

    graph: torch.fx.GraphModule
    inputs: list  # outside nodes, in the placeholders' order
    outputs: list  # region nodes whose values leave the region, in the output tuple's order
    output_axes: tuple  # per output, its (batch, sequence) axes; None for a Python value
    feeders: frozenset = frozenset()  # outside nodes computed inside it, for its islands (`_island_feeders`)


def packed_graph(gm: torch.fx.GraphModule, region: Region, seed: torch.fx.Node, make_tokens: Callable,
                 attention: Callable) -> Packed:
    """The region's nodes written again on packed tokens; the graph returns the region's outputs padded again
    (zeros at padded positions), then the call's `packing.Tokens`.

    ``make_tokens(seed_region, seed_args, batch, seq, reads, gathers, heads)`` computes the call's Tokens from the
    seed attention's mask (its arguments computed inside the region are None there), keeping the fixed positions
    ``reads`` and the positions the (batch index, sequence index) pairs ``gathers`` pick;
    ``attention(tokens, region, args, heads)`` runs one attention region on packed q, k and v. ``heads`` is the
    number of heads an attention's operands merge into their batch axis ([b·h, s, d]; 1 for [b, h, s, d]): its
    mask is built over that layout. Raises ValueError for a node with no packed form."""
    return _Builder(gm, region).build(seed, make_tokens, attention)


class _Builder:
    def __init__(self, gm, region: Region):
        self.gm, self.region = gm, region
        self.graph = torch.fx.Graph()
        self.inputs: list = []
        self.env: dict = {}  # region node -> its packed value; outside node -> its placeholder
        self.values = ValueKeys(gm.graph)
        self.same: dict = {}  # an outside value's key -> the placeholder read for it
        self.packed_operands: dict = {}  # (outside node, b axis, s axis) -> its packed form
        self.padded: dict = {}  # region node -> its value padded again, for the score terms' islands
        self.tokens = None

    def build(self, seed, make_tokens, attention) -> Packed:
        islands = self.region.island_nodes
        feeders = _island_feeders(self.gm, self.region)
        nodes = _in_order(self.gm, self.region.nodes | islands | feeders)
        for node in nodes:
            for a in node.all_input_nodes:
                if a not in self.region.nodes and a not in islands and a not in feeders:
                    self._input(a)
        batch, seq = self._grid_sizes(nodes)
        # the seed's real tokens come from its mask without its score terms: a term only added never masks a key
        no_term = self.graph.call_function(torch.zeros, ((),)) if islands else None
        seed_args = tuple(None if a in self.region.nodes else no_term if a in islands else
                          self.env[a] if isinstance(a, torch.fx.Node) else a for a in seed.args)
        reads = tuple(sorted(self.region.reads))
        gathers = sorted(self.region.gathers, key=lambda pair: (pair[0].name, pair[1].name))
        for pair in gathers:
            for index in pair:
                self._input(index)
        gathers = tuple((self.env[b], self.env[s]) for b, s in gathers)
        self.tokens = self.graph.call_function(make_tokens, (self.graph.get_attr(seed.target), seed_args, batch, seq,
                                                              reads, gathers, merged_heads(self.gm, seed, self.region)))
        for node in nodes:
            self.env[node] = self._island(node) if node in islands or node in feeders else \
                self._translate(node, attention)
        outputs = [n for n in nodes if n not in islands and n not in feeders and any(
            u not in self.region.nodes and u not in islands and not _served_by_input(u, n, self.region, self.inputs)
            for u in n.users)]  # a size read outside: read off an input instead
        values, axes = [], []
        for node in outputs:
            if _is_tensor(node):
                b, s = self.region.axes(node)
                values.append(self.graph.call_function(packing.unpack, (self.env[node], self.tokens, b, s)))
                axes.append((b, s))
            else:
                values.append(self.env[node])
                axes.append(None)
        self.graph.output(tuple(values) + (self.tokens,))
        # pickled as its graph: torch's way re-traces the code, which runs fxbt's packing functions on proxies
        module = make_picklable(torch.fx.GraphModule(self.gm, self.graph, class_name="PaddingFree"))
        return Packed(module, self.inputs, outputs, tuple(axes), frozenset(feeders))

    def _island(self, node):
        """A node of a score term's island, as the model wrote it, on the region's values padded again."""
        return self._copy(node, lambda a: self._padded(a) if a in self.region.nodes and _is_tensor(a) else self.env[a])

    def _padded(self, node):
        if node not in self.padded:
            axes = self.region.axes(node)
            self.padded[node] = self.graph.call_function(
                packing.unpack, (self.env[node], self.tokens, axes[0], axes[1], axes.heads))
        return self.padded[node]

    def _input(self, node):
        """A placeholder for each outside value; values computed alike (a mask each layer builds again) are read
        from the first one, so the packed graph hands its attentions one tensor, and what they derive from it
        per call is derived once."""
        if node not in self.env:
            placeholder = self.graph.placeholder(f"in_{node.name}")
            placeholder.meta = dict(node.meta)
            self.env[node] = self.same.setdefault(self.values.key(node), placeholder)
            self.inputs.append(node)

    def _grid_sizes(self, nodes):
        """The batch and sequence sizes at run time, read off a value entering the region with both axes."""
        for node in self.inputs:
            axes = self.region.axes(node) if _is_tensor(node) else None
            if axes is not None and not _is_merged(axes) and axes.heads == 1:
                size = self.graph.call_method("size", (self.env[node],))
                return (self.graph.call_function(operator.getitem, (size, axes[0])),
                        self.graph.call_function(operator.getitem, (size, axes[1])))
        raise _NoPackedForm("no value with both token axes enters the region")

    # -- one node ----------------------------------------------------------------------------------------
    def _translate(self, node, attention):
        kind = _kind(self.gm, node)
        if kind == "split":
            return self._with_dims(node)
        if kind == "getitem" and _is_parts(node.args[0]):
            return self.graph.call_function(operator.getitem, (self.env[node.args[0]], node.args[1]))
        if not _is_tensor(node) and node not in self.region.attentions:
            return self._python(node)
        if kind == "attention":
            return self._attention(node, attention)
        if kind == "view":
            return self._view(node)
        if kind == "join" and (part := _only_part(node)) is not None:
            return self.env[part]
        if kind in ("layout", "split", "join"):
            return self._with_dims(node)
        if kind == "getitem":
            index = _full_index(node.args[1], len(sym(node.args[0])))
            dropped = self.region.axes(node.args[0]).dropped
            dims = itertools.accumulate((i is not None for i in index), initial=0)  # input axis of each entry
            kept = tuple(i for d, i in zip(dims, index) if i is None or d not in dropped)
            kept = torch.fx.node.map_arg(kept, lambda a: self.env[a])  # sizes in slices: ``qkv[..., e:2 * e]``
            return self.graph.call_function(operator.getitem, (self.env[node.args[0]], (slice(None),) + kept))
        if kind == "embedding":  # the token ids are packed, the table is read as it is
            ids = node.args[0]
            return self._copy(node, lambda a: self._operand(a, node, drop_last=True) if a is ids else self.env[a])
        if kind in ("last_dim", "matmul"):  # weights, biases, eps: read as they are; an input from outside, packed
            first = _data_operand(self.gm, node)
            new = self._copy(node, lambda a: self._operand(a, node) if a is first else self.env[a])
            if kind == "last_dim":
                new.args, new.kwargs = self._last_dim_args(node, new)
            return new
        return self._copy(node, lambda a: self._operand(a, node))

    def _python(self, node):
        """A Python value: a size query of a packed value answers for the padded tensor it stands for."""
        if is_size_query(node) and node.args and node.args[0] in self.region.nodes and _is_tensor(node.args[0]):
            axes = self.region.axes(node.args[0])
            b, s = axes
            x = self.env[node.args[0]]
            name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
            if name in ("size", "sym_size", "int"):
                dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
                return self.graph.call_function(packing.logical_size, (x, self.tokens, b, s, dim, axes.heads))
            if node.target is getattr and node.args[1] == "shape":
                return self.graph.call_function(packing.logical_size, (x, self.tokens, b, s, None, axes.heads))
            if node.target is getattr:  # dtype, device
                return self.graph.call_function(getattr, (x, node.args[1]))
            if name == "dim":
                return len(sym(node.args[0]))
            raise _NoPackedForm(f"size query {name}")
        return self.graph.node_copy(node, lambda a: self.env[a])

    def _copy(self, node, operand):
        new = self.graph.create_node(node.op, node.target, torch.fx.node.map_arg(node.args, operand),
                                     torch.fx.node.map_arg(node.kwargs, operand))
        new.meta = {"fxbt_packed_from": node.name}
        return new

    def _last_dim_args(self, node, new):
        """A dim argument counted from the front names another axis once the token axes are packed."""
        name = _name(node)
        if name not in _LAST_DIM - {"linear", "layer_norm", "rms_norm"}:
            return new.args, new.kwargs
        kwargs = dict(new.kwargs)
        if "dim" in kwargs:
            kwargs["dim"] = -1
            return new.args, kwargs
        args = list(new.args)
        if len(args) > 1 and isinstance(args[1], int):
            args[1] = -1
        return tuple(args), kwargs

    def _operand(self, a, node, drop_last=False):
        """A region node's packed value; an outside tensor aligned to ``node``'s packed output: packed where it
        has the token axes (a per-position table), with the broadcast token axes dropped where it has not."""
        if a in self.region.nodes:
            return self.env[a]
        if not _is_tensor(a):
            return self.env[a]
        out = sym(node)
        axes = self.region.axes(node)
        b, s = axes
        shape = sym(a)
        rank = len(out) - (1 if drop_last else 0)
        padded = (1,) * (rank - len(shape)) + tuple(shape)
        if len(padded) != rank:
            raise _NoPackedForm(f"operand {a.name} has more axes than the result")
        if same(padded[b], 1) and same(padded[s], 1):
            lead = rank - len(shape)
            squeeze = sorted({d - lead for d in axes.dropped if d >= lead})
            if not squeeze:
                return self.env[a]
            return self.graph.call_function(_drop_axes, (self.env[a], tuple(squeeze)))
        key = (a, b, s, rank)
        if key not in self.packed_operands:
            lead = rank - len(shape)
            x = self.env[a]
            if lead:
                x = self.graph.call_function(_lead_axes, (x, lead))
            self.packed_operands[key] = self.graph.call_function(packing.pack, (x, self.tokens, b, s))
        return self.packed_operands[key]

    def _view(self, node):
        x = self.env[node.args[0]]
        name = _name(node)
        if name in ("view_as", "reshape_as"):
            other = node.args[1]
            target = self.env[other] if other in self.region.nodes else None
            if target is None:
                raise _NoPackedForm("a view as a tensor outside the region")
            return self.graph.call_method("reshape", (x, self.graph.call_method("size", (target,))))
        out, axes = sym(node), self.region.axes(node)
        rest = [axes.heads if d == axes[0] else self._size_arg(d, node) for d in range(len(out))
                if d not in axes.dropped]
        lead = -1 if all(not (isinstance(v, int) and v == -1) for v in rest) else \
            self.graph.call_function(packing.token_count, (x,))
        return self.graph.call_method("reshape", (x, (lead, *rest)))

    def _size_arg(self, d, node):
        """The size of axis ``d`` of a view's result: its own argument where it names one, else the size."""
        args = node.args[1:]
        if len(args) == 1 and isinstance(args[0], (list, tuple)):
            args = args[0]
        if _name(node) in ("view", "reshape") and len(args) == len(sym(node)):
            value = args[d]
            return self.env[value] if isinstance(value, torch.fx.Node) else value
        size = sym(node)[d]
        if isinstance(size, int):
            return size
        raise _NoPackedForm("a view to sizes it does not name")

    def _with_dims(self, node):
        op, args, kwargs = _translate_dims(node, self.region)
        args = torch.fx.node.map_arg(args, lambda a: self.env[a])
        if op is None:  # the token axes moved, the other axes did not: nothing to do
            return args[0]
        if isinstance(op, str):
            return self.graph.call_method(op, args, kwargs)
        return self.graph.call_function(op, args, kwargs)

    def _attention(self, node, attention):
        if runs_padded(self.gm, node, self.region):
            return self._padded_attention(node)
        args = tuple(self.env[a] if isinstance(a, torch.fx.Node) else a for a in node.args)
        heads = merged_heads(self.gm, node, self.region)
        return self.graph.call_function(attention, (self.tokens, self.graph.get_attr(node.target), args, heads))

    def _padded_attention(self, node):
        """The attention region itself, on its queries padded again (zeros at padded positions) and its other
        operands as they are (`runs_padded`); its output packed again."""
        q = _attention_operand(self.gm, node, "q")
        b, s = self.region.axes(q)
        padded_q = self.graph.call_function(packing.unpack, (self.env[q], self.tokens, b, s))
        operand = lambda a: padded_q if a is q else self.env[a]  # noqa: E731
        out = self.graph.call_module(node.target, torch.fx.node.map_arg(node.args, operand),
                                     torch.fx.node.map_arg(node.kwargs, operand))
        b, s = self.region.axes(node)
        return self.graph.call_function(packing.pack, (out, self.tokens, b, s))


# --- dims --------------------------------------------------------------------------------------------------


def _translate_dims(node, region: Region):
    """(target, args, kwargs) of a layout, split or join op on packed values: its dims counted among the
    packed axes; target None where only the token axes moved."""
    name = _name(node)
    first = _join_inputs(node)[0] if _kind_name(name) == "join" else node.args[0]
    rank_in = len(sym(first))
    axes_in = region.axes(first)
    packed_in = _packed_dims(rank_in, axes_in)
    if name in ("transpose", "swapaxes", "t", "permute"):
        perm = _permutation(node, rank_in)
        order = [packed_in[d] for d in perm if packed_in[d] is not None]
        if order == sorted(order):
            return None, (first,), {}
        return "permute", (first, (0, *order)), {}
    if name in ("unsqueeze",):
        rank_out = rank_in + 1
        d = _arg(node, 1, "dim") % rank_out
        axes_out = region.axes(node)
        if d in axes_out:
            raise _NoPackedForm("it adds an axis where a token axis goes")
        return "unsqueeze", (first, _packed_dims(rank_out, axes_out)[d]), {}
    if name == "squeeze":
        dim = _arg(node, 1, "dim")
        if dim is None:
            raise _NoPackedForm("squeeze of every size-1 axis")
        dims = dim if isinstance(dim, (list, tuple)) else (dim,)
        if any(d % rank_in in axes_in for d in dims):
            raise _NoPackedForm("it squeezes a token axis")
        packed = tuple(packed_in[d % rank_in] for d in dims)
        return "squeeze", (first, packed), {}
    if name in ("expand", "broadcast_to"):
        sizes = _expanded_sizes(node)
        if len(sizes) != rank_in:
            raise _NoPackedForm("expand to more axes")
        if any(v is None for d, v in enumerate(sizes) if d not in axes_in):
            raise _NoPackedForm("expand to a size that is not fixed, named by a whole shape")
        return "expand", (first, (-1, *(-1 if d in axes_in else v for d, v in enumerate(sizes)
                                         if d not in axes_in.dropped))), {}
    if name in ("chunk", "split", "unbind"):
        index = {"chunk": 2, "split": 2, "unbind": 1}[name]
        dim = _arg(node, index, "dim", 0) % rank_in
        if dim in axes_in:
            raise _NoPackedForm(f"{name} along a token axis")
        args = list(node.args) + [None] * (index + 1 - len(node.args))
        args[index] = packed_in[dim]
        return (node.target if node.op == "call_method" else node.target), tuple(a for a in args if a is not None) \
            if name == "unbind" else tuple(args[:index + 1]), {k: v for k, v in node.kwargs.items() if k != "dim"}
    if name in ("cat", "concat", "concatenate", "stack"):
        rank_out = len(sym(node))
        dim = _arg(node, 1, "dim", 0)
        if name == "stack":
            axes_out = region.axes(node)
            d = dim % rank_out
            if d in axes_out:
                raise _NoPackedForm("stack along a token axis")
            packed_dim = _packed_dims(rank_out, axes_out)[d]
        else:
            if dim % rank_in in axes_in:
                raise _NoPackedForm("cat along a token axis")
            packed_dim = packed_in[dim % rank_in]
        return node.target, (_join_inputs(node), packed_dim), {}
    raise _NoPackedForm(f"{name} has no packed form")


def _expanded_sizes(node) -> tuple:
    """The sizes an expand or broadcast_to names, one per axis; given as one shape (``k.broadcast_to(q.shape)``),
    the output's own sizes, where fixed (the token axes are -1 in the packed form whatever they are)."""
    sizes = node.args[1:] if not (len(node.args) == 2 and isinstance(node.args[1], (list, tuple))) else node.args[1]
    if len(sizes) == 1 and isinstance(sizes[0], torch.fx.Node) and not isinstance(sizes[0].meta.get("fxbt_val"), int):
        return tuple(int(v) if is_static(v) else None for v in sym(node))
    return tuple(sizes)


def _segments(shape_in, axes_in, shape_out, axes_out) -> bool:
    """A reshape that keeps the token axes, in the same order, and reshapes only the axes before, between and
    after them, each group into one of the same size: on packed tokens it is a reshape of the other axes. It may
    merge the two token axes into one (batch outer, nothing between them) or split such an axis, and merge the
    sizes right after the batch axis into it (batch·heads, batch outer) or split them off again."""
    if axes_in is None or axes_out is None or (axes_in[0] <= axes_in[1]) != (axes_out[0] <= axes_out[1]):
        return False

    def groups(shape, axes):
        lo, hi = sorted(axes)
        parts = [tuple(shape[:lo]), tuple(shape[lo + 1:hi]), tuple(shape[hi + 1:])]
        if axes.heads > 1:  # batch outer: the heads are the first size after the batch
            after = 1 if axes[0] < axes[1] else 2
            parts[after] = (axes.heads,) + parts[after]
        return parts

    def product(sizes):
        out = 1
        for size in sizes:
            out = out * size
        return out

    return all(same(product(a), product(b)) for a, b in zip(groups(shape_in, axes_in), groups(shape_out, axes_out)))


def _only_part(node):
    """The one input of a ``cat`` whose other inputs are empty along its dim for every admitted size, or None."""
    if _name(node) not in ("cat", "concat", "concatenate"):
        return None
    parts = _join_inputs(node)
    rank = len(sym(node)) if isinstance(sym(node), tuple) else 0
    dim = _arg(node, 1, "dim", 0)
    if not rank or not isinstance(dim, int):
        return None
    def empty(a):  # cat skips a 1-d empty tensor whatever the others' rank (``torch.tensor([])``)
        shape = sym(a) if isinstance(a, torch.fx.Node) else None
        return isinstance(shape, tuple) and (shape == (0,) or len(shape) == rank and same(shape[dim % rank], 0))

    live = [a for a in parts if not empty(a)]
    return live[0] if len(live) == 1 and isinstance(live[0], torch.fx.Node) else None


def _is_parts(node) -> bool:
    """A split's value: a tuple of tensors."""
    value = node.meta.get("fxbt_val") if isinstance(node, torch.fx.Node) else None
    return isinstance(value, (tuple, list)) and bool(value) and all(isinstance(v, TensorInfo) for v in value)


def _is_merged(axes) -> bool:
    return axes is not None and axes[0] == axes[1]


def _data_operand(gm, node):
    """The tensor a linear-like node computes over (addmm's is its second argument)."""
    first = canonical_op(node, gm).operands[0] if node.op != "call_module" else None
    return first if isinstance(first, torch.fx.Node) else node.args[0] if node.args else None


def _kind_name(name) -> str:
    return "join" if name in _JOIN else name


def _packed_dims(rank, axes: Axes) -> list:
    """Axis d of the padded tensor -> its axis in the packed one (None for the token axes it has none for)."""
    out, nxt = [], 1
    for d in range(rank):
        if d in axes.dropped:
            out.append(None)
        else:
            out.append(nxt)
            nxt += 1
    return out


def _permutation(node, rank) -> list:
    name = _name(node)
    if name == "t":
        return [1, 0]
    if name in ("transpose", "swapaxes"):
        a, c = _arg(node, 1, "dim0") % rank, _arg(node, 2, "dim1") % rank
        perm = list(range(rank))
        perm[a], perm[c] = perm[c], perm[a]
        return perm
    dims = node.args[1:] if not (len(node.args) == 2 and isinstance(node.args[1], (list, tuple))) else node.args[1]
    return [d % rank for d in node.kwargs.get("dims", dims)]


def _join_inputs(node):
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    return list(tensors)


def _full_index(index, rank):
    """A getitem index as one entry per axis of the input (Ellipsis expanded), or None."""
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, torch.fx.Node) for i in index) or sum(i is Ellipsis for i in index) > 1:
        return None
    consumed = sum(1 for i in index if i is not Ellipsis and i is not None)
    out = []
    for i in index:
        if i is Ellipsis:
            out.extend([slice(None)] * (rank - consumed))
        else:
            out.append(i)
    return out + [slice(None)] * (rank - sum(1 for i in out if i is not None))


# --- helpers ----------------------------------------------------------------------------------------------


def _drop_axes(x, axes):
    return x.squeeze(axes) if axes else x


def _lead_axes(x, count):
    return x.reshape((1,) * count + tuple(x.shape))


def _alignable(operand, node, region: Region, drop_last=False) -> bool:
    """An outside operand broadcast against ``node``'s result: it has the token axes at the result's token axes
    (or 1 there), so it can be packed or have them dropped."""
    out = sym(node)
    shape = sym(operand)
    axes = region.axes(node)
    if not isinstance(shape, tuple) or axes is None:
        return not isinstance(shape, tuple)  # a Python value broadcasts
    rank = len(out) - (1 if drop_last else 0)
    if len(shape) > rank:
        return False
    padded = (1,) * (rank - len(shape)) + tuple(shape)
    b, s = axes
    if b == s or axes.heads > 1:  # a merged axis: its order is known inside the region only
        return all(same(padded[d], 1) for d in axes) and \
            not any(same(x, region.batch) or same(x, region.seq) for x in padded)
    ok_b = same(padded[b], 1) or same(padded[b], region.batch)
    ok_s = same(padded[s], 1) or same(padded[s], region.seq)
    others = [padded[d] for d in range(rank) if d not in (b, s)]
    no_tokens_elsewhere = not any(same(x, region.batch) or same(x, region.seq) for x in others)
    return ok_b and ok_s and no_tokens_elsewhere


def _carries_tokens(node, region: Region) -> bool:
    return _is_tensor(node) and region.axes(node) is not None


def _is_tensor(node) -> bool:
    return isinstance(node, torch.fx.Node) and isinstance(node.meta.get("fxbt_val"), TensorInfo)


def is_attention(gm, node) -> bool:
    """``node`` calls an attention region (an SDPA region of the attention pass)."""
    if node.op != "call_module":
        return False
    module = gm.get_submodule(node.target)
    return getattr(module, "kernel", None) == "sdpa" and "q" in getattr(module, "slots", {})


def merged_heads(gm, attention, region: Region) -> int:
    """How many heads an attention region's queries merge into their batch axis (1: none)."""
    return region.axes(_attention_operand(gm, attention, "q")).heads


def _attention_operand(gm, node, name):
    slot = gm.get_submodule(node.target).slots[name]
    return node.args[slot.index] if slot.index is not None else None


def _island_feeders(gm, region: Region) -> set:
    """Nodes outside the region computed for its islands alone (DeBERTa's position keys, projected and repeated
    over the batch in each layer). As inputs of the packed graph they would all be computed before it and held
    at once (24 tensors of 12 MB each for DeBERTa-v3-base at batch 8, fresh pages on every call); inside it, each
    is computed where the model computes it and freed after its use. Random ops stay outside."""
    islands, found = region.island_nodes, set()
    for node in reversed(gm.graph.nodes):
        if node.op not in ("call_function", "call_method") or node in region.nodes or node in islands:
            continue
        if node.users and all(u in islands or u in found for u in node.users) and deterministic(node):
            found.add(node)
    return found


def _in_order(gm, nodes) -> list:
    """``nodes`` in graph order (region calls have no captured position)."""
    return [n for n in gm.graph.nodes if n in nodes]


def _arg(node, index, name, default=None):
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default
