"""Padding-free stacks: every node around an attention that can run on the real tokens alone does.

The pattern is one attention (an SDPA region of the attention pass, whatever form the model wrote it in):

    def attention_stack(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

The check grows, from that attention, the region of nodes that carry its batch and sequence axes and compute
each (batch, position) from the same (batch, position) of their inputs (fxbt/padding.py): embeddings,
projections, norms, activations, residuals, per-position tables, the other attentions of the stack. That
region is written again on packed tokens ([T, ...], T the real tokens of the batch): the model's own ops, so no
block template is assumed, and every norm, activation and position scheme runs as the model wrote it.

At run time the seed attention's own mask says which tokens are real: a key column masked for every query is
padding. Positions read after the region by a fixed index (a pooler's first token) are computed even where
they are padding: as queries they follow from the real keys like any token, so they come out exact. Each
attention of the region then runs per sequence on that sequence's real tokens, with its mask restricted to them
(none where it is all zeros, ``is_causal`` where it is causal); where no sequence keeps a mask, on CUDA, all of
them in one call (fxbt/varlen.py): variable-length flash attention in fp16 or bf16, otherwise one SDPA call over
the sequences padded to the longest. It is exact only if
every real query gives the padded keys no weight, which is checked per call for every attention; a call where
it does not hold, where nothing is padding, or where a position read after the region is padding, runs the
original subgraph. Values leaving the region are scattered back with zeros at padded positions; what reads
them across positions (pooling, a convolution over the sequence) was kept out of the region when it was grown.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fxbt import varlen
from fxbt.canon import origin
from fxbt.packing import Tokens
from fxbt.padding import cone, is_attention, merged_heads, packed_graph, runs_padded, token_region
from fxbt.pattern import Accept, Decline, Rule
from fxbt.region import Slot, UseOriginal, absorb_size_computations, slot_value
from fxbt.verify import run_without_dropout, verifying

from .attention import (MASKED, _dropout_p, _fully_masked_rows, build_mask, call_sdpa, check_padded_keys,
                        sdpa_attention)


def attention_stack(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


# --- the replacement ------------------------------------------------------------------------------------


class Unpacked(tuple):
    """The region's outputs, padded again; it marks, per output, the positions that hold real tokens
    (``fxbt_real``; verification compares only those: padded positions hold zeros by design)."""

    fxbt_real: list

    def fxbt_materialize(self):
        return tuple(self)


def padding_free(inputs, *, graph, output_axes, key_readers=(), key_padding=None, factors=(), blanking=(),
                 factors_lost=()):
    # key_readers, key_padding: for after_padding_free; factors, blanking, factors_lost: given by it (``_take_factors``)
    if factors_lost:  # what blanks its padded positions can no longer be checked: they must hold the original's values
        raise UseOriginal("the factors blanking its padded positions after it are gone from the graph "
                          f"({', '.join(factors_lost)})")
    try:
        *values, tokens = run_without_dropout(graph, inputs) if verifying() else graph(*inputs)
    except UseOriginal as e:  # raised inside the graph: its first line is the reason (fx appends the node)
        raise UseOriginal(str(e).splitlines()[0]) from None
    for factor, (axes, kind) in zip(factors, blanking):
        _blanks_padding(factor, tokens, axes, kind)
    out = Unpacked(values)
    out.fxbt_real = [None if axes is None else _real_at(tokens, axes, v.dim())
                for axes, v in zip(output_axes, values)]
    return out


def _blanks_padding(factor: torch.Tensor, tokens: Tokens, axes, kind: str) -> None:
    """A factor an output is multiplied by after the region (``"zero"``: where it is zero the product is zero), or
    a condition it is filled under (``"fill"``), must blank every padded position: then what the region leaves
    there is never read. Otherwise the original computes this call."""
    padded = ~_real_at(tokens, axes, factor.dim())
    blank = factor == 0 if kind == "zero" else factor.bool()
    if bool((padded & ~blank).any()):
        raise UseOriginal("a factor after the stack (a pooling mask) does not blank every padded position")


def _real_at(tokens: Tokens, axes, rank: int) -> torch.Tensor:
    """``keep`` shaped to broadcast against an output with its token axes at ``axes``."""
    shape = [1] * rank
    if axes[0] == axes[1]:  # one merged batch·sequence axis
        shape[axes[0]] = tokens.batch * tokens.seq
        return tokens.keep.reshape(shape)
    shape[axes[0]], shape[axes[1]] = tokens.batch, tokens.seq
    keep = tokens.keep if axes[0] < axes[1] else tokens.keep.t()
    return keep.reshape(shape)


# --- real tokens, from the seed attention's mask -------------------------------------------------------


def real_tokens(seed, args, batch: int, seq: int, reads=(), gathers=(), merged_heads=1) -> Tokens:
    """The call's real tokens: the key columns the seed attention's mask does not mask for every query."""
    if batch * seq == 0:
        raise UseOriginal("an empty batch or sequence")
    mask = _mask_of(seed, _arguments(seed, args), _scores_shape(batch, seq, 1, merged_heads))
    mask = _by_sequence(mask, batch, merged_heads)
    keep = real_columns(mask, batch, seq)
    if keep is None and verifying():  # an example with no padding still verifies the packed path
        keep = torch.ones(batch, seq, dtype=torch.bool, device=mask.device)
    if keep is None:
        raise UseOriginal("no token is padding in this call")
    if reads or gathers:  # positions read after the region (a pooler's) are computed even where padding
        keep = keep.clone()
        keep[:, list(reads)] = True
        for b, s in gathers:
            keep[b, s] = True
        if bool(keep.all()) and not verifying():
            raise UseOriginal("no token is padding in this call")
    return Tokens(keep)


def real_columns(mask, batch: int, seq: int) -> torch.Tensor | None:
    """[batch, seq]: the key columns ``mask`` does not mask for every query (None: every one). UseOriginal where
    the mask says nothing about padding."""
    if mask is None:
        raise UseOriginal("the attention has no mask: no token is known to be padding")
    masked = _masked(mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)))  # [..., queries, keys] -> 4-d
    if masked.shape[-1] != seq:
        raise UseOriginal("the attention mask does not cover every key")
    keep = ~masked.all(-2).all(-2).expand(batch, seq)
    if not bool(keep.any(-1).all()):  # what the original computes for it (NaN under -inf masks) is its own
        raise UseOriginal("a sequence has no real token")
    return None if bool(keep.all()) else keep


def _scores_shape(batch: int, seq: int, heads: int, merged_heads: int) -> tuple:
    """The padded scores a mask is built over: [b, h, s, s], or [b·h, s, s] for an attention whose operands merge
    ``merged_heads`` > 1 heads into their batch axis."""
    return (batch, heads, seq, seq) if merged_heads == 1 else (batch * merged_heads, seq, seq)


def _by_sequence(mask, batch: int, heads: int):
    """A mask over [b·h, q, k] scores (``heads`` > 1) as [b, h, q, k]: batch outer, as the region proved its
    queries are."""
    if mask is None or heads == 1:
        return mask
    mask = mask.reshape((1,) * (3 - mask.dim()) + tuple(mask.shape))
    if mask.shape[0] == 1:
        return mask.unsqueeze(0)
    if mask.shape[0] != batch * heads:
        raise UseOriginal("the attention mask does not broadcast over batch·heads")
    return mask.reshape(batch, heads, *mask.shape[1:])


# --- attention, per sequence ---------------------------------------------------------------------------


class _Spec:
    """One attention call in SDPA's terms: its mask over the padded grid (or None), and its arguments."""

    def __init__(self, mask, is_causal, scale, dropout_p, gqa, exact_rows):
        self.mask, self.is_causal, self.scale, self.dropout_p, self.gqa = mask, is_causal, scale, dropout_p, gqa
        self.exact_rows = exact_rows  # the original's fully masked rows, replayed on SDPA's output (or None)


def _arguments(region, args) -> dict:
    return {name: slot_value(slot, args) for name, slot in region.slots.items()}


def _mask_source(region) -> tuple:
    """Where an attention region's mask comes from: (its program over the terms in slot ``mask_terms``, or None
    where slot ``mask`` holds the mask itself; that slot's name)."""
    if region.replacement is sdpa_attention:
        return region.params["program"], "mask_terms"
    if region.replacement is call_sdpa:
        return None, "mask"
    raise UseOriginal(f"no per-sequence form for {region.rule}")


def mask_from(program, terms, scores_shape):
    """The mask ``program`` builds over ``terms`` (None: the one term is the mask), or None."""
    return terms[0] if program is None else build_mask(program, terms, torch.float32, scores_shape)


def _mask_inputs(region, kwargs) -> tuple:
    """(the attention's mask program or None, the terms it is built from) for one call's arguments."""
    program, slot = _mask_source(region)
    return program, kwargs.get(slot, ()) if program is not None else (kwargs[slot],)


def _mask_of(region, kwargs, scores_shape):
    """The attention's mask over the padded grid, as its region's replacement would build it (or None)."""
    return mask_from(*_mask_inputs(region, kwargs), scores_shape)


def _shared_mask(tokens: Tokens, region, kwargs, heads: int, merged_heads: int):
    """The attention's mask over the padded grid, [b or 1, h or 1, q, k]; attentions building theirs by the same
    program from the same tensors share one within a call (T5's layers all add the first layer's position bias),
    and so share its restriction to the real tokens (`_restricted_masks`)."""
    program, terms = _mask_inputs(region, kwargs)
    scores_shape = _scores_shape(tokens.batch, tokens.seq, heads, merged_heads)
    key = ("built", _hashable(program), tuple(map(_hashable, terms)), scores_shape)
    if key not in tokens.cache:
        mask = _by_sequence(mask_from(program, terms, scores_shape), tokens.batch, merged_heads)
        tokens.cache[key] = (terms, mask)  # the terms live as long as their ids
    return tokens.cache[key][1]


def _hashable(value):
    """``value`` itself where it is a plain constant, its identity where it is a tensor or unhashable."""
    if isinstance(value, torch.Tensor):
        return id(value)
    try:
        hash(value)
    except TypeError:
        return id(value)
    return value


def _attention_spec(tokens: Tokens, region, args, heads: int, merged_heads: int) -> _Spec:
    kwargs = _arguments(region, args)
    mask, p = _shared_mask(tokens, region, kwargs, heads, merged_heads), region.params
    scale = p["scale"]
    if region.replacement is sdpa_attention:
        for term, power in zip(kwargs.get("scale_terms", ()), p["scale_powers"]):
            scale = scale * term**power
        rows = lambda out, sub, q, k: _fully_masked_rows(out, sub, p.get("replaces", False), q, k, scale)  # noqa: E731
        return _Spec(mask, False, scale, _dropout_p(p["dropout"], region.training), p["gqa"], rows)
    for term, power in zip(kwargs.get("scale_terms", ()), p["scale_powers"]):  # call_sdpa
        scale = (1.0 if scale is None else scale) * term**power
    return _Spec(mask, p["is_causal"], scale, 0.0 if verifying() else p["dropout_p"], p["enable_gqa"], None)


# devices where attention varlen's kernel cannot take (fp32, dropout) runs as one SDPA call over the sequences
# padded to the longest, not one call per sequence: on an H100 a BERT-base training step went from 0.51x to 1.64x
# over eager (bench/RESULTS.md); on the CPU one call per sequence wastes no work on padding
ONE_PADDED_CALL = {"cuda"}


def per_sequence_attention(tokens: Tokens, region, args, merged_heads: int = 1):
    """One attention region on packed q, k, v ([T, heads, head dim]): each sequence on its real tokens.
    ``merged_heads`` > 1: the padded operands merge that many heads into their batch axis ([b·h, s, d])."""
    q, k, v = (slot_value(region.slots[n], args) for n in ("q", "k", "v"))
    spec = _attention_spec(tokens, region, args, q.shape[1], merged_heads)
    masks = _restricted_masks(tokens, spec)
    causal = varlen.uniform_causality(masks, tokens.lengths())
    if causal is not None and varlen.fits(q, k, v, spec.dropout_p, spec.gqa):
        return varlen.attention(tokens, q, k, v, causal, spec.scale, spec.gqa)
    if causal is not None and q.device.type in ONE_PADDED_CALL:
        return varlen.padded_attention(tokens, q, k, v, causal, spec.scale, spec.dropout_p, spec.gqa)
    outs = []
    for (start, n), (mask, causal) in zip(zip(tokens.offsets(), tokens.lengths()), masks):
        if n == 0:
            continue
        q1, k1, v1 = (x[start:start + n].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q1, k1, v1, attn_mask=mask, is_causal=causal, scale=spec.scale,
                                             dropout_p=spec.dropout_p, enable_gqa=spec.gqa)
        if mask is not None and spec.exact_rows is not None:
            out = spec.exact_rows(out, mask, q1, k1)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)


def _restricted_masks(tokens: Tokens, spec: _Spec) -> list:
    """Per sequence, (mask over its real tokens or None, is_causal); shared by the attentions that read the
    same mask in this call. UseOriginal where a real query would give a padded key weight."""
    key = ("mask", id(spec.mask), spec.is_causal)
    if key not in tokens.cache:
        tokens.cache[key] = _restrict(tokens, spec)
    return tokens.cache[key][1]


def _restrict(tokens: Tokens, spec: _Spec):
    if spec.mask is None:
        if spec.is_causal and bool((tokens.keep.int().cummin(1).values == tokens.keep.int()).all()):
            # causal with every sequence's real tokens first: real queries see only real keys
            return spec.mask, [(None, True)] * tokens.batch
        raise UseOriginal("an attention without a mask would read padded keys")
    mask = spec.mask.reshape((1,) * (4 - spec.mask.dim()) + tuple(spec.mask.shape))
    masked = _masked(mask)
    real_row = tokens.keep[:, None, :, None] if mask.shape[-2] > 1 else tokens.keep.any(1)[:, None, None, None]
    if not bool((masked | tokens.keep[:, None, None, :] | ~real_row).all()):
        raise UseOriginal("an attention's mask lets real tokens read padded keys")
    if bool((masked.all(-1, keepdim=True) & real_row).any()):
        # the original spreads such a row over every key, padded ones too
        raise UseOriginal("a computed token's row masks every key")
    causal = _same_in_every_sequence(mask, masked, tokens, spec.is_causal)
    if causal is not None:
        return spec.mask, [(None, causal)] * tokens.batch
    out = []
    for i, positions in enumerate(tokens.positions()):
        sub = mask[i if mask.shape[0] > 1 else 0]
        if sub.shape[-2] > 1:
            sub = sub.index_select(-2, positions)
        sub = sub.index_select(-1, positions)
        if bool((sub if sub.dtype == torch.bool else sub == 0).all()):
            out.append((None, spec.is_causal))
        elif not spec.is_causal and _is_causal(sub):
            out.append((None, True))
        else:
            out.append((sub.unsqueeze(0), spec.is_causal))
    return spec.mask, out  # the mask is kept alive with its entry: the key is its id


def _same_in_every_sequence(mask, masked, tokens: Tokens, is_causal: bool) -> bool | None:
    """What is left of the mask among every sequence's real tokens, tested for the whole batch at once: nothing
    (False), exactly the keys after each query (True: causal), or neither for some sequence (None: each sequence
    keeps its own restriction). Attentions that are causal already stay causal."""
    keep = tokens.keep
    pairs = keep[:, None, None, :] & (keep[:, None, :, None] if mask.shape[-2] > 1 else True)  # real query, real key
    moved = ~masked & (mask != 0) if mask.dtype != torch.bool else torch.zeros_like(masked)  # a finite bias
    left = [(pairs & (masked | moved)).any()]
    if mask.shape[-2] == tokens.seq:
        later = torch.ones(tokens.seq, tokens.seq, dtype=torch.bool, device=mask.device).triu(1)  # key after query
        left.append((pairs & ((masked ^ later) | moved)).any())
    nothing, *causal = torch.stack(left).tolist()  # one sync for both
    if not nothing:
        return is_causal
    return True if causal and not causal[0] else None


def _masked(mask: torch.Tensor) -> torch.Tensor:
    return ~mask if mask.dtype == torch.bool else mask <= MASKED


def _is_causal(sub: torch.Tensor) -> bool:
    n = sub.shape[-1]
    if sub.shape[-2] != n:
        return False
    lower = torch.ones(n, n, dtype=torch.bool, device=sub.device).tril()
    if sub.dtype == torch.bool:
        return bool((sub == lower).all())
    return bool((sub[..., lower] == 0).all() and (sub[..., ~lower] <= MASKED).all())


# --- the check ------------------------------------------------------------------------------------------


def check_padding_free(match) -> Accept | Decline:
    call = origin(match.root)
    gm = call.graph.owning_module
    if not is_attention(gm, call):
        return Decline("not an attention region")
    attention = gm.get_submodule(call.target)
    if attention.replacement not in (sdpa_attention, call_sdpa):
        return Decline(f"no per-sequence form for {attention.rule}")
    if not _may_mask_keys(attention):
        return Decline("its attention has no mask: no token is ever padding")
    if not any(isinstance(t, torch.fx.Node) and not t.meta.get("fxbt_shape_only") for t in _mask_terms(gm, call)):
        return Decline("its mask is computed from sizes alone (no input masks a token): no token is ever padding")
    region = token_region(gm, call)
    if isinstance(region, str):
        return Decline(region)
    region.nodes = absorb_size_computations(region.nodes)
    _check_readers_in(gm, region)
    try:
        packed = packed_graph(gm, region, call, real_tokens, per_sequence_attention)
    except ValueError as e:
        return Decline(str(e))
    zeros = _left_zeros(gm)
    if any(a in zeros and region.axes(a) is not None for a in packed.inputs):
        # its real tokens need not be the other region's: it would read zeros where the original has values
        return Decline("it reads values another padding-free region left zeros in")
    blocks = len(region.attentions)
    key_padding = _key_padding(gm, call, region, packed)
    if isinstance(key_padding, str):
        return Decline(key_padding)
    terms = f", {len(region.islands)} score terms from its values" if region.islands else ""
    blanking = tuple(sorted((f.name, tuple(axes), kind) for f, axes, kind in region.factors))
    return Accept(inputs={"inputs": tuple(packed.inputs)},
                  params={"graph": packed.graph, "output_axes": packed.output_axes, **key_padding,
                          **({"blanking": blanking} if blanking else {})},
                  absorb=tuple(region.nodes | region.island_nodes | packed.feeders), outputs=tuple(packed.outputs),
                  note=f"{len(region.nodes)} nodes, {blocks} attention{'s' if blocks != 1 else ''} on real tokens"
                       f"{terms}", impl="packed")


def _may_mask_keys(region) -> bool:
    """The attention reads a mask (or is causal, where a run-time mask may still come with it)."""
    if region.replacement is sdpa_attention:
        return any(step[0] in ("add", "sub", "fill", "keep") for step in region.params["program"])
    slot = region.slots.get("mask")
    return slot is not None and (slot.index is not None or slot.value is not None)


def _mask_terms(gm, call) -> tuple:
    """The values an attention region's mask is built from: nodes of ``gm``, or constants."""
    attention = gm.get_submodule(call.target)
    slot = attention.slots[_mask_source(attention)[1]]
    return slot.args_of(call) if slot.many or slot.index is not None else (slot.value,)


def _left_zeros(gm) -> set:
    """Nodes computed from the outputs of padding-free regions installed so far (zeros at padded positions)."""
    found = set()
    frontier = [n for n in gm.graph.nodes if n.op == "call_module" and
                getattr(gm.get_submodule(n.target), "kernel", None) in ("padding_free", "fused_encoder")]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user not in found:
                found.add(user)
                frontier.append(user)
    return found


def _key_padding(gm, seed, region, packed) -> dict | str:
    """For attentions after the region that read its output as keys or values (cross-attention): their names, and
    the seed attention's mask as inputs of the region (positions in its inputs, or constants) with its program."""
    if not region.key_readers:
        return {}
    if merged_heads(gm, seed, region) > 1:  # its mask is over [b·h, q, k]: see _by_sequence
        return "an attention after it reads it as keys, and its mask is over batch·heads"
    program, _ = _mask_source(gm.get_submodule(seed.target))
    terms = _mask_terms(gm, seed)
    if any(isinstance(t, torch.fx.Node) and t not in packed.inputs for t in terms):
        return "an attention after it reads it as keys, and its mask is computed inside it"
    refs = tuple(packed.inputs.index(t) if isinstance(t, torch.fx.Node) else t for t in terms)
    return {"key_readers": tuple(sorted(r.target for r in region.key_readers)), "key_padding": (program, refs)}


def after_padding_free(gm, installed, report) -> None:
    """The packed graph becomes a child of its region, so ``.to()``, ``.half()`` and copies reach it; attentions
    reading a region's output as keys get the seed's mask, to check per call that they mask the padded keys."""
    calls = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    for node, region in installed:
        region.add_module("packed", region.params["graph"])
        _take_factors(gm, node, region)
        # a reader a later region took in (a decoder's cross-attention) got its check then: `_check_readers_in`
        _check_key_readers(gm, node, region, [calls[t] for t in region.params.get("key_readers", ()) if t in calls])


def _take_factors(gm, node, region) -> None:
    """The factors that blank the region's padded positions after it (a pooling mask) become inputs of its call,
    for it to check per call (`_blanks_padding`): their computations, from the graph's inputs alone, move before it."""
    if "factors" in region.slots or not region.params.get("blanking"):
        return
    by_name = {n.name: n for n in gm.graph.nodes}
    lost = tuple(name for name, _, _ in region.params["blanking"] if name not in by_name)
    if lost:  # another rewrite took a factor in: no call could be checked, so none runs padding-free
        region.params["factors_lost"] = lost
        return
    named = [(by_name[name], axes, kind) for name, axes, kind in region.params["blanking"]]
    later, n = set(), node.next
    while n.op != "root":
        later.add(n)
        n = n.next
    for factor, _, _ in named:
        for moved in cone(factor):
            if moved in later:
                node.prepend(moved)
                later.discard(moved)
    start = len(node.args)
    node.args = tuple(node.args) + tuple(factor for factor, _, _ in named)
    region.slots["factors"] = Slot(index=tuple(range(start, len(node.args))), many=True)
    region.params["blanking"] = tuple((axes, kind) for _, axes, kind in named)


def _check_key_readers(gm, node, region, readers) -> None:
    """Give the attentions in ``readers`` that read the output of the padding-free region ``node`` as keys its
    mask, to check per call that they mask its padded positions (`check_padded_keys`)."""
    if not region.params.get("key_readers"):
        return
    program, refs = region.params["key_padding"]
    inputs = region.slots["inputs"].args_of(node)
    terms = [inputs[r] if isinstance(r, int) else r for r in refs]
    for reader in readers:
        check_padded_keys(gm, reader, terms, ("dead_columns", program), [node.target])


def _check_readers_in(gm, region) -> None:
    """The cross-attentions a region takes in that read an installed padding-free region's output as keys get
    that region's check now, before they leave the graph: their call nodes become part of the packed graph."""
    padded = {n.target: n for n in region.attentions if runs_padded(gm, n, region)}
    for node in gm.graph.nodes:
        if node.op != "call_module" or getattr(gm.get_submodule(node.target), "kernel", None) != "padding_free":
            continue
        source = gm.get_submodule(node.target)
        _check_key_readers(gm, node, source, [padded[t] for t in source.params.get("key_readers", ()) if t in padded])


RULES = [
    # after the encoder-block template (priority 1, only with encoder_impl="fused"), whose fused kernel takes the
    # blocks that fit it; this pass takes the stacks around every attention left
    Rule("padding_free", attention_stack, padding_free, check_padding_free, kernel="padding_free", priority=2,
         after_pass=after_padding_free),
]
