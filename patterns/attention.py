"""Softmax attention -> ``scaled_dot_product_attention``.

One pattern covers every way models write ``softmax(Q·Kᵀ·scale + mask)·V``:

    def softmax_attention(q, kt, v):
        return torch.matmul(torch.softmax(chain(torch.matmul(q, kt)), dim=-1), v)

The canonical view already makes ``bmm``/``@``/``einsum``, transposes written as permutes, dropout and
dtype casts look alike; `chain` stands for whatever the model does to the scores in between, in any
order: scale by multiplication or division, additive masks and position biases, boolean masks through
``masked_fill`` or ``where``, ALiBi through ``baddbmm``. The check reads that chain into a small
*mask program* that the replacement replays at run time, so the mask SDPA receives is the one the
model built. Two cases let SDPA skip the mask: no mask at all (proven from the graph), or a purely
causal one (``is_causal=True``, the flash path). A mask built from sizes alone is a fact about the sizes:
whether it is causal is established at run time, once per size, by building it (`CausalProof`), so a
sliding window longer than the example is never taken for causal. The check also looks through a scale
applied to Q or K beforehand, a transposed K, and keys/values repeated for grouped-query attention
(``enable_gqa=True``). Shapes are compared symbolically (fxbt/shapes.py), over every admitted size.

A query row whose every key is masked gives NaN in the original where the mask is -inf (SDPA gives 0),
and the softmax of the fill values where ``masked_fill`` replaces scores: the replacement reproduces the
first and leaves the second to the original subgraph.

A second rule recognises attention that already calls SDPA (transformers' default), so the encoder
fusion sees it as attention too.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from fxbt.canon import Const, TensorInfo, Virtual, origin
from fxbt.layout import broadcast_source
from fxbt.meta import is_size_query, val
from fxbt.pattern import Accept, Decline, Rule, chain, views
from fxbt.region import RecomputeCall, Region, Slot, UseOriginal, boundary, extract, fetch, install
from fxbt.shapes import fixed, number, same, sym
from fxbt.verify import verifying

MASKED = -1e4  # scores at or below this get exactly zero probability after softmax (exp underflows)


# --- pattern and replacement ------------------------------------------------------------------


def softmax_attention(q, kt, v):
    return torch.matmul(views(torch.softmax(chain(torch.matmul(q, kt)), dim=-1)), v)


def sdpa_attention(q, k, v, mask_terms=(), scale_terms=(), padding_terms=(), *, k_transposed, program, scale,
                   scale_powers, causal, dropout, gqa, replaces=False, proof=None, padding_program=None,
                   training=False):
    if k_transposed:
        k = k.transpose(-2, -1)
    for term, power in zip(scale_terms, scale_powers):
        scale = scale * term**power
    scores_shape = q.shape[:-1] + k.shape[-2:-1]
    dropout_p = _dropout_p(dropout, training)
    if causal and q.shape[-2] == k.shape[-2] and proof.holds(program, mask_terms, scores_shape):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale,
                                              enable_gqa=gqa)
    mask = build_mask(program, mask_terms, q.dtype, scores_shape)
    if padding_program is not None:
        _padded_keys_are_masked(mask, padding_program, padding_terms, k)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale, enable_gqa=gqa)
    return out if mask is None else _fully_masked_rows(out, mask, replaces, q, k, scale)


def check_padded_keys(gm, reader: torch.fx.Node, terms, padding_program, sources) -> None:
    """Give an attention region that reads a padding-free stack's output as keys or values (cross-attention
    over an encoder's output) the stack's own mask, so that it checks per call that its mask gives the zeros
    left at padded positions no weight. ``padding_program``: ("key_padding" or "dead_columns", the stack's mask
    program over ``terms``; None: the one term is the mask). ``sources``: the stack's regions, which must be
    reverted with this one (verification does): without its check, the zeros they leave would be read."""
    region = gm.get_submodule(reader.target)
    region.padding_sources = tuple(sorted(set(getattr(region, "padding_sources", ())) | set(sources)))
    if region.params.get("padding_program") is not None:
        return
    index, added = [], []
    for term in terms:  # nodes become arguments of the call; constants stay in the slot
        if isinstance(term, torch.fx.Node):
            index.append(len(reader.args) + len(added))
            added.append(term)
        else:
            index.append(term)
    reader.args = tuple(reader.args) + tuple(added)
    region.slots["padding_terms"] = Slot(index=tuple(index), many=True)
    region.params["padding_program"] = padding_program


def _padded_keys_are_masked(mask, padding_program, terms, k) -> None:
    """Keys and values from a padding-free stack hold zeros at padded positions, where the original holds
    its own values: exact only where this attention's mask gives those keys no weight and leaves every query
    some real key (a row masking every key weighs all keys alike under a finite fill)."""
    from .encoder import key_padding_of
    from .padding_free import mask_from, real_columns

    (kind, program), (b, s) = padding_program, (k.shape[0], k.shape[-2])
    try:
        if kind == "key_padding":
            keep = key_padding_of(program, terms, b, s)
        else:
            keep = real_columns(mask_from(program, terms, (b, 1, s, s)), b, s)
    except UseOriginal:  # the stack ran its original computation in this call: no zeros to check
        return
    if keep is None:
        return
    padded = (~keep)[:, None, None, :]
    if mask is not None:
        mask = mask.expand(*mask.shape[:-1], keep.shape[-1])
        masked = ~mask if mask.dtype == torch.bool else mask <= MASKED  # SDPA's boolean masks: True attends
    if mask is None or not bool(masked.logical_or(~padded).all()) or bool(masked.all(-1).any()):
        raise RecomputeCall("keys from a padding-free stack are read at padded positions this attention's mask "
                            "does not mask")


def _fully_masked_rows(out, mask, replaces: bool, q, k, scale):
    """Rows whose every key is masked. Where the mask is -inf throughout, the original's softmax is NaN
    (SDPA returns 0): NaN. Where masked scores are replaced by a finite fill value, the original takes the
    softmax of the fills, SDPA of score + fill: the same numbers when no score can move the fill by one
    unit in the last place (finfo.min fills: scores below 1e31), which a bound on |q|·|k| shows; otherwise
    the original subgraph computes the call."""
    dead = (mask <= MASKED).all(-1)
    if not bool(dead.any()):
        return out
    everywhere_inf = torch.isneginf(mask).all(-1)
    finite = dead & ~everywhere_inf
    if replaces and bool(finite.any()) and not _scores_vanish_beside(mask, finite, q, k, scale):
        raise UseOriginal("a query row has every key masked by a fill value scores could move")
    return out.masked_fill(everywhere_inf[..., None], float("nan"))


def _scores_vanish_beside(mask, rows, q, k, scale) -> bool:
    """Every |score| is below half a unit in the last place of every masked value of these rows."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bound = (q.float().norm(dim=-1).amax() * k.float().norm(dim=-1).amax() * abs(float(scale))).item()
    smallest = mask.expand(*rows.shape, mask.shape[-1])[rows].abs().min().item()
    return bound < torch.finfo(mask.dtype).eps * smallest / 4


def _dropout_p(dropout, training: bool) -> float:
    p, mode = dropout
    active = training if mode == "module" else bool(mode)
    return p if active and not verifying() else 0.0


class CausalProof:
    """Whether a mask built from sizes alone is exactly the causal mask, per size.

    Such a mask is a function of the input sizes and of constant buffers (their version counters are part
    of the key), so whether it is causal is a fact about the sizes: it is decided by building the mask once
    for each size and kept. A mask term computed anyway (not deferred) is checked on every call."""

    LIMIT = 256

    def __init__(self):
        self.known: dict = {}

    def holds(self, program, terms, scores_shape) -> bool:
        key = _size_key(terms, scores_shape)
        if key is not None and key in self.known:
            return self.known[key]
        verdict = is_causal_mask(build_mask(program, terms, torch.float32, scores_shape))
        if key is not None:
            if len(self.known) >= self.LIMIT:
                self.known.pop(next(iter(self.known)))
            self.known[key] = verdict
        return verdict

    def __deepcopy__(self, memo):
        return CausalProof()

    def __getstate__(self):
        return {"known": {}}


def _size_key(terms, scores_shape):
    parts = [tuple(scores_shape[-2:])]  # the query and key lengths; batch and heads only broadcast
    for term in terms:
        if not isinstance(term, Deferred):
            return None
        parts.append(term.key())
    return tuple(parts)


def is_causal_mask(mask) -> bool:
    """The additive mask keeps exactly the keys at or before each query (broadcast over batch and heads)."""
    if mask is None or mask.dim() < 2 or mask.shape[-1] != mask.shape[-2]:
        return False
    n = mask.shape[-1]
    keep = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    return bool((mask[..., keep] == 0).all() and (mask[..., ~keep] <= MASKED).all())


def build_mask(program: tuple, terms: tuple, dtype: torch.dtype, scores_shape):
    """Replay the score modifiers on zero scores: the additive mask SDPA adds to Q·Kᵀ·scale.

    A ``reshape`` of the scores (BLOOM views [b·h, q, k] as [b, h, q, k]) is replayed on the mask
    expanded to the scores' full shape; the result is put back into the product's layout.
    """
    mask, shape, reshaped = None, tuple(scores_shape), False
    for step in program:
        kind, args = step[0], step[1:]
        if kind == "reshape":
            full = torch.zeros((), dtype=dtype) if mask is None else mask
            mask = full.expand(shape).reshape(tuple(_term(a, terms) for a in args[0]))
            shape, reshaped = tuple(mask.shape), True
        elif kind == "scale":
            mask = None if mask is None else mask * _term(args[0], terms) ** args[1]
        elif kind == "add":
            term = _term(args[0], terms) * args[1]
            mask = term if mask is None else mask + term
        elif kind == "sub":
            term = _term(args[0], terms)
            mask = -term if mask is None else mask - term
        else:  # "fill": masked positions take the value; "keep": unmasked positions keep the scores
            cond, value = _term(args[0], terms), _term(args[1], terms)
            zero = torch.zeros((), dtype=dtype, device=cond.device) if mask is None else mask
            value = torch.as_tensor(value, dtype=dtype, device=cond.device)
            mask = torch.where(cond, value, zero) if kind == "fill" else torch.where(cond, zero, value)
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        return None  # a constant added to every score does not change the softmax
    if reshaped:
        mask = mask.expand(shape).reshape(scores_shape)
    return mask.to(dtype)


def _term(ref, terms):
    if not (isinstance(ref, tuple) and ref and ref[0] == "term"):
        return ref
    value = terms[ref[1]]
    return value.value() if isinstance(value, Deferred) else value


class Deferred:
    """A mask computed only if a region asks for it (see `defer_causal_masks`)."""

    def __init__(self, compute, inputs, kinds):
        self.compute, self.inputs, self.kinds, self._value = compute, inputs, kinds, None

    def value(self):
        if self._value is None:
            self._value = self.compute(*self.inputs)
        return self._value

    fxbt_materialize = value

    def key(self):
        """What the mask is a function of: sizes, the sizes of inputs it reads sizes of, and constant buffers
        (identity and version); None where an input is read for its values (no key: checked every time)."""
        parts = []
        for x, kind in zip(self.inputs, self.kinds):
            if not isinstance(x, torch.Tensor):
                parts.append(x)
            elif kind[0] == "sizes":
                dims = range(x.dim()) if kind[1] is None else kind[1]
                parts.append((tuple(x.shape[d] for d in dims), x.dtype, x.device))
            elif kind == "constant":
                parts.append((id(x), x._version, x.data_ptr()))
            else:
                return None
        return tuple(parts)


def defer(inputs, *, compute, kinds):
    return Deferred(compute, inputs, kinds)


def defer_causal_masks(gm, installed, report) -> None:
    """A mask that only proven-causal regions read is built from sizes alone and ignored whenever query and
    key lengths are equal (every self-attention without a KV cache). Put its subgraph in a region of its own
    that hands over a `Deferred`, so it is computed only when a region needs it. Unroll restores it."""
    causal = {node for node, region in installed if region.params["causal"]}
    terms = {t for node, region in installed if node in causal
             for t in region.slots["mask_terms"].args_of(node) if isinstance(t, torch.fx.Node)}
    for term in sorted(terms, key=lambda n: n.meta.get("fxbt_pos", 0)):
        if not term.users or not all(u in causal for u in term.users):
            continue
        interior = _shape_only_producers(term)
        inputs = boundary(interior, gm.graph)
        kinds = tuple(_input_kind(node, interior) for node in inputs)
        original = extract(gm, interior, term, inputs)
        region = Region("deferred_causal_mask", "deferred", original, defer,
                        {"inputs": Slot(index=tuple(range(len(inputs))), many=True)},
                        {"compute": original, "kinds": kinds})
        install(gm, region, interior, term, inputs)


def _input_kind(node, interior):
    """How a deferred mask reads an input: ("sizes", the dims it reads or None for all), "constant" (a
    buffer), or "values"."""
    if node.op == "get_attr":
        return "constant"
    readers = [u for u in node.users if u in interior]
    if not all(is_size_query(u) for u in readers):
        return "values"
    dims = set()
    for u in readers:
        dim = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim")
        if not isinstance(dim, int) or u.op == "call_function" and u.target is getattr:
            return ("sizes", None)
        dims.add(dim)
    return ("sizes", tuple(sorted(dims)))


def _shape_only_producers(term) -> set:
    """``term`` and every shape-only node above it used by nothing else."""
    interior, changed = {term}, True
    while changed:
        changed = False
        for node in [a for n in interior for a in n.all_input_nodes if a not in interior]:
            if (node.op in ("call_function", "call_method") and node.meta.get("fxbt_shape_only")
                    and all(u in interior for u in node.users)):
                interior.add(node)
                changed = True
    return interior



# --- the check --------------------------------------------------------------------------------


class _Plan:
    """What the check learns about one attention site while reading it."""

    def __init__(self, match):
        self.match, self.graph = match, match.graph
        self.absorb: list = []
        self.terms: list = []  # graph values the mask program reads
        self.scale_terms: list = []  # graph scalars multiplied into the scale at run time
        self.scale_powers: list = []  # +1 or -1 for each of them
        self.scale = 1.0
        self.program: list = []

    def term(self, value) -> tuple | Any:
        if isinstance(value, Const):
            return value.value
        self.terms.append(value)
        return ("term", len(self.terms) - 1)

    def exclusive(self, key, users_inside) -> bool:
        node = origin(key)
        return all(u in users_inside for u in node.users)


def check_softmax_attention(match) -> Accept | Decline:
    g = match.graph
    q, kt, v = match.bindings["q"], match.bindings["kt"], match.bindings["v"]
    if any(isinstance(x, Const) for x in (q, kt, v)):
        return Decline("query, key or value is a constant")
    plan = _Plan(match)
    root = match.root
    softmax = _softmax_of(g, root)
    if softmax is None:
        return Decline("no softmax feeds the value product")
    leak = _probabilities_leak(match, softmax)
    if leak:
        return Decline("attention probabilities are also returned" if leak == "output" else
                       "attention probabilities are also used outside the attention")
    steps = list(reversed(match.chains.get("chain", [])))
    for key, pos in steps:
        reason = _read_step(plan, g, key, pos)
        if reason:
            return Decline(reason)
    inside = set(match.nodes())
    q, reason = _peel_scale(plan, g, q, inside)
    if reason:
        return Decline(reason)
    k, k_transposed, reason = _resolve_key(plan, g, kt, inside)
    if reason:
        return Decline(reason)
    k, v, gqa = _grouped_query(plan, g, k, v, inside)
    gqa = gqa or _one_shared_head(q, k, v, k_transposed)
    reason = _check_shapes(g, q, k, v, k_transposed, gqa, match)
    if reason:
        return Decline(reason)
    causal = _causal_candidate(plan)
    dropout = _dropout_of(g, softmax, root)
    note = "is_causal where the mask is causal at the call's sizes" if causal else (
        "no mask" if not plan.terms and not plan.program else "")
    return Accept(
        inputs={"q": q, "k": k, "v": v, "mask_terms": tuple(plan.terms), "scale_terms": tuple(plan.scale_terms)},
        params={"k_transposed": k_transposed, "program": tuple(plan.program), "scale": plan.scale,
                "scale_powers": tuple(plan.scale_powers), "causal": causal, "dropout": dropout, "gqa": gqa,
                "replaces": any(step[0] in ("fill", "keep") for step in plan.program),
                "proof": CausalProof() if causal else None},
        absorb=tuple(plan.absorb),
        note=note,
    )


def _softmax_of(g, root):
    probs, _ = g.through_transparent(g.operands(root)[0])
    while not isinstance(probs, Const) and g.op(probs) == "reshape":
        probs, _ = g.through_transparent(g.operands(probs)[0])
    return probs if not isinstance(probs, Const) and g.op(probs) == "softmax" else None


def _probabilities_leak(match, softmax) -> str | None:
    """Are the probabilities (or their dropout/cast) used anywhere but the value product?"""
    g = match.graph
    inside = match.nodes()
    key = softmax
    while True:
        node = origin(key)
        outside = [u for u in node.users if u not in inside]
        if outside:
            return "output" if any(u.op == "output" or _reaches_output(u) for u in outside) else "other"
        nxt = [u for u in g.users(key) if origin(u) in inside and u is not match.root]
        if not nxt:
            return None
        key = nxt[0]


def _reaches_output(node, limit=8) -> bool:
    for _ in range(limit):
        if node.op == "output":
            return True
        if len(node.users) != 1:
            return any(u.op == "output" for u in node.users)
        node = next(iter(node.users))
    return False


def _read_step(plan: _Plan, g, key, pos) -> str | None:
    """Translate one score modifier into the mask program; return a reason if it cannot be."""
    op = g.op(key)
    operands = g.operands(key)
    if op in ("float_cast",) or op in ("dropout", "contiguous", "clone", "to_device", "identity"):
        return None
    if op == "reshape":
        return _reshape_step(plan, key)
    other = operands[1 - pos] if op in ("add", "mul", "sub", "div") else None
    if op in ("mul", "div"):
        if op == "div" and pos != 0:
            return "scores are a divisor"
        factor, reason = _scalar(plan, g, other)
        if reason:
            return reason
        if op == "div":
            factor = ("inv", factor)
        _apply_scale(plan, factor)
        return None
    if op == "add":
        term, coef = _additive(g, other)
        plan.program.append(("add", plan.term(_unbroadcast(plan, g, term)), coef))
        return None
    if op == "sub":
        if pos != 0:
            return "scores are subtracted from a tensor"
        plan.program.append(("sub", plan.term(other)))
        return None
    if op == "masked_fill" and pos == 0:
        return _fill_step(plan, g, "fill", operands[1], operands[2])
    if op == "where":
        return _fill_step(plan, g, "keep" if pos == 1 else "fill", operands[0], operands[2 if pos == 1 else 1])
    return f"score modifier {op} is not a scale or a mask"


def _reshape_step(plan, key) -> str | None:
    node = origin(key)
    if isinstance(key, Virtual) or node.target not in ("view", "reshape", torch.reshape):
        return f"scores are reshaped by {node.target}"
    sizes = node.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = sizes[0]
    refs = tuple(plan.term(s) if isinstance(s, torch.fx.Node) else s for s in sizes)
    plan.program.append(("reshape", refs))
    return None


def _fill_step(plan, g, kind, cond, value) -> str | None:
    """Masked positions set to a fill value: a constant, or a graph value used as it is at run time."""
    if isinstance(value, Virtual):
        return "the masked fill value is computed from the scores"
    known = value.value if isinstance(value, Const) else val(value)
    if isinstance(known, TensorInfo):
        known = known.value.max().item() if known.value is not None and known.value.numel() else None
    if not isinstance(known, (int, float)) or known > MASKED:
        return f"masked scores are set to {known}, not to a large negative constant"
    if not isinstance(value, Const) and _varies(origin(value)):
        return "the masked fill value is computed from sizes or inputs that can change"
    fill = plan.term(value)
    plan.program.append((kind, plan.term(_unbroadcast(plan, g, cond)), fill))
    return None


def _varies(node, seen=None) -> bool:
    """Could this value differ between calls? Reading an input's values or any size may; reading a dtype or
    device may not (the call's kind fixes those)."""
    seen = set() if seen is None else seen
    if node in seen:
        return False
    seen.add(node)
    if node.op == "placeholder" or is_size_query(node) and not _reads_metadata(node):
        return True
    return any(_varies(a, seen) for a in node.all_input_nodes if not _reads_metadata(node))


def _reads_metadata(node) -> bool:
    return node.op == "call_function" and node.target is getattr and node.args[1] in ("dtype", "device")


def _unbroadcast(plan, g, key):
    """Use a mask before ``expand``/``expand_as``: SDPA broadcasts it, and the expansion may read the scores' shape."""
    while (not isinstance(key, Const) and not isinstance(key, Virtual) and g.op(key) == "expand"
           and _only_feeds(key, plan.match.nodes() | set(map(origin, plan.absorb)))):
        plan.absorb.append(key)
        key = g.operands(key)[0]
    return key


def _apply_scale(plan: _Plan, factor, on_scores=True) -> None:
    """A scale on the scores scales what was added before it, and the global scale; one on Q or K
    (``on_scores=False``) only the global scale."""
    inverse = isinstance(factor, tuple) and factor[0] == "inv"
    value = factor[1] if inverse else factor
    if isinstance(value, (int, float)):
        number = 1.0 / value if inverse else float(value)
        plan.scale *= number
        if plan.program and on_scores:
            plan.program.append(("scale", number, 1))
        return
    # a run-time scalar (computed from a size, say): a term of the scale, and of the mask if one came before
    power = -1 if inverse else 1
    plan.scale_terms.append(value)
    plan.scale_powers.append(power)
    if plan.program and on_scores:
        plan.program.append(("scale", plan.term(value), power))


def _scalar(plan, g, key):
    """A scale: a constant, a graph scalar, or a 0-d tensor built from one by ``full``/``tensor``."""
    if isinstance(key, Const):
        if isinstance(key.value, (int, float)) and not isinstance(key.value, bool):
            return key.value, None
        if isinstance(key.value, torch.Tensor) and key.value.numel() == 1:
            return key.value.item(), None
        return None, f"scale {key.value!r} is not a number"
    if isinstance(key, Virtual):
        return None, "scale is a tensor"
    value = val(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return key, None  # a Python scalar computed in the graph (e.g. from a size): read at run time
    if g.op(key) == "param" and isinstance(value, TensorInfo) and value.ndim == 0 and value.value is not None:
        if isinstance(fetch(g.gm, key.target), torch.nn.Parameter):
            return None, "scale is a learnable parameter"
        return value.value.item(), None  # a constant tensor of the model (GPT-J's scale_attn)
    if g.op(key) == "scalar_tensor":  # torch.full([], x) or torch.tensor(x): the scale is x
        inner, reason = _scalar(plan, g, g.operands(key)[0])
        if reason or isinstance(inner, (int, float)):
            return inner, reason
        if not _only_feeds(key, plan.match.nodes() | set(map(origin, plan.absorb))):
            return None, "scale is a tensor"
        plan.absorb.append(key)  # so that x, not the tensor, becomes the region's input
        return inner, None
    return None, "scale is a tensor"


def _additive(g, key):
    """An additive term; ``beta * bias`` from baddbmm is read as the bias with a coefficient."""
    if isinstance(key, Virtual) and g.op(key) == "mul":
        a, b = g.operands(key)
        if isinstance(b, Const):
            return a, b.value
    return key, 1.0


def _peel_scale(plan, g, q, inside):
    """Absorb scalar scales applied to Q before the product (used by nothing else)."""
    while not isinstance(q, Const) and g.op(q) in ("mul", "div") and _only_feeds(q, inside):
        a, b = g.operands(q)
        x, other = (a, b)
        if g.op(q) == "mul" and _is_scalarish(g, a) and not _is_scalarish(g, b):
            x, other = b, a
        factor, reason = _scalar(plan, g, other)
        if reason or isinstance(x, Const):
            break
        _apply_scale(plan, ("inv", factor) if g.op(q) == "div" else factor, on_scores=False)
        inside.add(origin(q))
        plan.absorb.append(q)
        q = x
    return q, None


def _is_scalarish(g, key) -> bool:
    if isinstance(key, Const):
        return True
    value = val(origin(key))
    return not isinstance(value, TensorInfo) or value.ndim == 0


def _only_feeds(key, inside) -> bool:
    node = origin(key)
    return not isinstance(key, Virtual) and bool(node.users) and all(u in inside for u in node.users)


def _resolve_key(plan, g, kt, inside):
    """Find K itself: through a transpose (real or einsum's virtual one) and any scale on it."""
    kt, _ = _peel_scale(plan, g, kt, inside)
    if isinstance(kt, Virtual):  # einsum with the rhs transposed: the operand is K
        k = g.operands(kt)[0]
        k, _ = _peel_scale(plan, g, k, inside)
        return k, False, None
    if g.op(kt) == "transpose" and g.canon(kt).attrs.get("dims") == (-2, -1) and _only_feeds(kt, inside):
        inside.add(origin(kt))
        plan.absorb.append(kt)
        k = g.operands(kt)[0]
        k, _ = _peel_scale(plan, g, k, inside)
        return k, False, None
    return kt, True, None


def _grouped_query(plan, g, k, v, inside):
    """Keys and values repeated per query group (repeat_kv) are passed unrepeated with enable_gqa."""
    k_base, k_nodes = _unrepeated(g, k)
    v_base, v_nodes = _unrepeated(g, v)
    if k_base is None or v_base is None:
        return k, v, False
    if not all(_only_feeds(n, inside | set(map(origin, k_nodes + v_nodes))) for n in k_nodes + v_nodes):
        return k, v, False
    plan.absorb.extend(k_nodes + v_nodes)
    inside.update(map(origin, k_nodes + v_nodes))
    return k_base, v_base, True


def _unrepeated(g, x):
    """``x = base[:, :, None].expand(b, h, n, s, d).reshape(b, h*n, s, d)`` or ``repeat_interleave(base, n, 1)``."""
    if isinstance(x, Const):
        return None, []
    xv = val(x)
    if not isinstance(xv, TensorInfo) or xv.ndim != 4:
        return None, []
    if g.op(x) == "repeat_interleave":
        base = g.operands(x)[0]
        attrs = g.canon(x).attrs
        if attrs.get("dim") in (1, -3) and isinstance(attrs.get("repeats"), int):
            return base, [x]
        return None, []
    if g.op(x) == "expand":  # one K/V head expanded over the query heads: [b, 1, s, d] -> [b, h, s, d]
        base = g.operands(x)[0]
        bs, xs = (sym(origin(base)) if not isinstance(base, Const) else None), sym(origin(x))
        if isinstance(bs, tuple) and isinstance(xs, tuple) and len(bs) == len(xs) == 4 and number(bs[1]) == 1 \
                and same(bs[0], xs[0]) and same(bs[2:], xs[2:]):
            return base, [x]
        return None, []
    if g.op(x) != "reshape":
        return None, []
    expanded = g.operands(x)[0]
    if isinstance(expanded, Const) or g.op(expanded) != "expand":
        return None, []
    inserted = g.operands(expanded)[0]
    if isinstance(inserted, Const):
        return None, []
    base = _unsqueezed_at_2(g, inserted)
    if base is None:
        return None, []
    bs, es, xs = sym(origin(base)), sym(origin(expanded)), sym(origin(x))
    if not isinstance(bs, tuple) or not isinstance(es, tuple) or not isinstance(xs, tuple) or len(bs) != 4 or \
            len(es) != 5:
        return None, []
    b, h, s, d = bs
    if not same(es[:2], (b, h)) or not same(es[3:], (s, d)) or not same(xs[1], h * es[2]):
        return None, []
    return base, [x, expanded, inserted]


def _unsqueezed_at_2(g, key):
    op = g.op(key)
    if op == "unsqueeze" and g.canon(key).attrs.get("dim") == 2:
        return g.operands(key)[0]
    if op == "getitem":
        index = g.canon(key).attrs.get("index")
        if isinstance(index, tuple) and 3 <= len(index) <= 5 and index[2] is None and all(
                isinstance(i, slice) and i == slice(None) for j, i in enumerate(index) if j != 2):
            return g.operands(key)[0]  # x[:, :, None] or x[:, :, None, :, :]
    return None


def _one_shared_head(q, k, v, k_transposed) -> bool:
    """Multi-query attention written as a broadcast: K and V [b, 1, s, d] against Q [b, h, s, d]; SDPA's
    enable_gqa takes one K/V head for every query head as they are (for every admitted size)."""
    qs, ks, vs = sym(origin(q)), sym(origin(k)), sym(origin(v))
    if not all(isinstance(x, tuple) and len(x) == 4 for x in (qs, ks, vs)):
        return False
    kb = ks[:2]
    return number(kb[1]) == 1 == number(vs[1]) and (number(qs[1]) or 0) > 1 and same(qs[0], kb[0]) and \
        same(qs[0], vs[0])


def _check_shapes(g, q, k, v, k_transposed, gqa, match) -> str | None:
    """Q, K and V fit one attention for every admitted size (symbolic shapes, not the example's)."""
    qv, kv, vv = val(origin(q)), val(origin(k)), val(origin(v))
    if not all(isinstance(x, TensorInfo) for x in (qv, kv, vv)):
        return "query, key or value has no recorded shape"
    if qv.ndim < 3 or not (qv.ndim == kv.ndim == vv.ndim):
        return f"query, key and value ranks {qv.ndim}, {kv.ndim}, {vv.ndim} are not one rank of at least 3"
    if not (qv.dtype == kv.dtype == vv.dtype) or not qv.dtype.is_floating_point:
        return "query, key and value dtypes differ"
    qs, ks, vs = sym(origin(q)), sym(origin(k)), sym(origin(v))
    if not all(isinstance(x, tuple) for x in (qs, ks, vs)):
        return "query, key or value has no symbolic shape"
    k_shape = ks[:-2] + (ks[-1], ks[-2]) if k_transposed else ks
    if not same(qs[-1], k_shape[-1]) or not same(k_shape[-2], vs[-2]):
        return "query, key and value sizes do not fit one attention"
    batch_q, batch_k, batch_v = qs[:-2], k_shape[:-2], vs[:-2]
    if gqa:
        heads_q, heads_k = number(batch_q[1]), number(batch_k[1])
        if qv.ndim != 4 or not same(batch_k, batch_v) or not same(batch_q[0], batch_k[0]) or not heads_q or \
                not heads_k or heads_q % heads_k:
            return "grouped-query heads do not divide the query heads"
    elif not (same(batch_q, batch_k) and same(batch_k, batch_v)):
        return "query, key and value batch sizes differ (broadcasting attention)"
    product, scores_in = sym(origin(_qk_product(match))), sym(origin(_softmax_of(g, match.root)))
    probs = sym(origin(g.operands(match.root)[0]))
    if not all(isinstance(x, tuple) for x in (product, scores_in, probs)):
        return "scores have no symbolic shape"
    if not same(probs, product) or not same(math.prod(scores_in), math.prod(product)):
        return "the mask broadcasts the scores to a larger shape"
    out = val(origin(match.root))
    if isinstance(out, TensorInfo) and out.dtype != qv.dtype:
        return f"attention output dtype {out.dtype} differs from the query's {qv.dtype}"
    return None


def _qk_product(match):
    g = match.graph
    steps = match.chains.get("chain", [])
    key = g.operands(_softmax_of(g, match.root))[0] if not steps else g.operands(steps[-1][0])[steps[-1][1]]
    key, _ = g.through_transparent(key)
    return key


def _causal_candidate(plan: _Plan) -> bool:
    """A mask built from sizes alone that is causal on the example: the replacement decides, per size, whether
    it is causal there too (`CausalProof`); the example alone proves nothing for other sizes."""
    if not plan.program or any(step[0] == "reshape" for step in plan.program):
        return False
    values = []
    for term in plan.terms:
        node = origin(term)
        info = val(node)
        if not node.meta.get("fxbt_shape_only") or not isinstance(info, TensorInfo) or info.value is None:
            return False
        values.append(info.value)
    try:
        return is_causal_mask(build_mask(tuple(plan.program), tuple(values), torch.float32, ()))
    except Exception:  # noqa: BLE001 - a mask that cannot be replayed here is not a candidate
        return False


def _dropout_of(g, softmax, root) -> tuple[float, Any]:
    """The dropout on the probabilities: (p, mode) with mode True/False (baked in) or "module"."""
    probs = g.operands(root)[0]
    while not isinstance(probs, Const) and probs != softmax:
        if g.op(probs) == "dropout":
            attrs = g.canon(probs).attrs
            training, p = attrs.get("training"), attrs.get("p") or 0.0
            if training is False:
                return (0.0, False)  # baked in as inactive
            if isinstance(p, torch.fx.Node):  # a float lifted to a graph input (torch.compile)
                p = val(p)
            return (float(p), training) if p else (0.0, False)
        probs = g.operands(probs)[0]
    return (0.0, False)


# --- attention that already calls SDPA ----------------------------------------------------------


def existing_sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def call_sdpa(q, k, v, mask, scale_terms=(), padding_terms=(), *, dropout_p, is_causal, scale, scale_powers,
              enable_gqa, padding_program=None):
    for term, power in zip(scale_terms, scale_powers):  # a scale read at run time (a module attribute)
        scale = (1.0 if scale is None else scale) * term**power
    if padding_program is not None:  # keys from a padding-free stack (cross-attention)
        _padded_keys_are_masked(mask, padding_program, padding_terms, k)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                          scale=scale, enable_gqa=enable_gqa)


def check_existing_sdpa(match) -> Accept | Decline:
    node = origin(match.root)
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    given = {n: node.kwargs[n] if n in node.kwargs else (node.args[i] if len(node.args) > i else None)
             for i, n in enumerate(names)}
    scale, terms = node.kwargs.get("scale"), ()
    if isinstance(scale, torch.fx.Node):  # a number when only sizes the weights fix go into it: q.size(-1) ** -0.5
        scale, terms = (fixed(scale), ()) if fixed(scale) is not None else (None, (scale,))
    mask, expanded = match.bindings["mask"], []
    if not isinstance(mask, Const):  # a mask expanded over heads (PyTorch's MHA): SDPA broadcasts the original
        inside = match.nodes()
        mask, expanded = broadcast_source(match.graph, mask, lambda key, above: _only_feeds(key, inside | set(above)))
    return Accept(
        inputs={**{k: match.bindings[k] for k in ("q", "k", "v")}, "mask": mask, "scale_terms": terms},
        params={"dropout_p": given["dropout_p"] or 0.0, "is_causal": bool(given["is_causal"]), "scale": scale,
                "scale_powers": (1,) * len(terms), "enable_gqa": bool(node.kwargs.get("enable_gqa", False))},
        absorb=tuple(expanded),
        note="already SDPA",
    )


RULES = [
    Rule("softmax_attention", softmax_attention, sdpa_attention, check_softmax_attention, kernel="sdpa",
         after_pass=defer_causal_masks),
    Rule("existing_sdpa", existing_sdpa, call_sdpa, check_existing_sdpa, kernel="sdpa"),
]
