"""Transformer encoder blocks -> PyTorch's fused encoder kernel, with padding removed across the whole stack.

Opt-in (``encoder_impl="fused"``): by default the padding-free pass (patterns/padding_free.py) runs every
stack on its real tokens with the model's own ops, measured as fast as this template's dense blocks on CPU
and faster than the fused kernel on CUDA (bench/RESULTS.md), so these rules run only when asked for.

Two patterns, post-norm (BERT) and pre-norm (mBART, ViT), written like the code they match. Attention
is whatever the attention pass made of the model's attention (an SDPA region) or an SDPA call already
in the model, so every attention form of that pass is covered:

    def post_norm_encoder_block(x, wq, bq, wk, bk, wv, bv, wo, bo, g1, n1, act, w2, b2, g2, n2):
        q, k, v = (heads(F.linear(heads(x), w, b)) for w, b in ((wq, bq), (wk, bk), (wv, bv)))
        h = F.layer_norm(heads(F.linear(heads(F.scaled_dot_product_attention(q, k, v)), wo, bo)) + x, ...)
        return F.layer_norm(F.linear(act, w2, b2) + h, ...)

``heads`` stands for the layout ops around the projections (head split and merge, a batch-first input
transposed to PyTorch's sequence-first attention and back); the check proves what they do by replay.

``act`` is left free in the pattern and read by the check, so a block with another activation is
found, then declined with the reason ("tanh approximation of gelu", "quick-gelu").

A matched block runs ``torch._transformer_encoder_layer_fwd`` on a nested tensor (BetterTransformer's
kernel).

Consecutive blocks are linked after the pass: the first gathers the real tokens, the last scatters
them back to the original padded shape (padded positions are zeros), and nothing in between pays for
padding. A block whose output is read by anything else (hidden states requested, say) ends the stack
there, so no caller ever sees a packed or nested value. Zeros at padded positions are exact for whatever
computes position by position up to the outputs; a stack whose output something reads across positions
(pooling, a convolution over the sequence) is reverted, and one whose output is read at fixed positions
(a pooler's ``hidden[:, 0]``) packs only calls where those positions are real (fxbt/tokens.py).

A block runs its original subgraph in training mode, when the mask turns out at run time not to be a
key-padding mask, when no token is real, and when gradients are needed (the kernel has no autograd).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fxbt.canon import Const, TensorInfo, origin
from fxbt.layout import numbered, path_down, replay, token_rows
from fxbt.meta import depends_on_sizes, is_size_query, val
from fxbt.pattern import Accept, Decline, Rule, heads
from fxbt.region import UseOriginal, inline_region
from fxbt.shapes import fixed, number, same, same_computation, sym
from fxbt.tokens import padded_reads

from .attention import MASKED, build_mask, check_padded_keys



def asked_for(options: dict) -> bool:
    """The template runs only for ``encoder_impl="fused"``: under "auto" the padding-free pass takes the stack
    (BERT-base at 25 and 50% padding on CPU: 1.01x and 0.96x the time of this template's former dense blocks;
    on an H100, fp16 batch 64 sequence 256: 11.7 ms against the fused kernel's 15.4 at 50% padding)."""
    return options.get("encoder_impl", "auto") == "fused"


# --- patterns -----------------------------------------------------------------------------------


def post_norm_encoder_block(x, wq, bq, wk, bk, wv, bv, wo, bo, g1, n1, act, w2, b2, g2, n2):
    q = heads(F.linear(heads(x), wq, bq))
    k = heads(F.linear(heads(x), wk, bk))
    v = heads(F.linear(heads(x), wv, bv))
    attention = heads(F.linear(heads(F.scaled_dot_product_attention(q, k, v)), wo, bo))
    h = F.layer_norm(attention + x, ..., g1, n1, ...)
    return F.layer_norm(F.linear(act, w2, b2) + h, ..., g2, n2, ...)


def pre_norm_encoder_block(x, g1, n1, wq, bq, wk, bk, wv, bv, wo, bo, act, w2, b2):
    n = F.layer_norm(x, ..., g1, n1, ...)
    q = heads(F.linear(heads(n), wq, bq))
    k = heads(F.linear(heads(n), wk, bk))
    v = heads(F.linear(heads(n), wv, bv))
    h = heads(F.linear(heads(F.scaled_dot_product_attention(q, k, v)), wo, bo)) + x
    return F.linear(act, w2, b2) + h


# --- the packed representation ----------------------------------------------------------------


@dataclass
class Packed:
    """The real tokens of a padded batch: ``nested`` holds one [length, E] tensor per sequence, in row-major order
    of ``keep`` [B, S] (or the padded batch itself where ``keep`` is None: no token is padding)."""

    nested: torch.Tensor
    keep: torch.Tensor
    index: torch.Tensor  # [T] flat positions of the real tokens in B*S
    padded_shape: tuple  # (B, S, E)
    seq_first: bool = False  # the padded tensor this stands for is [S, B, E] (PyTorch's default layout)

    # Size, rank, dtype and device queries answer for the padded tensor this stands for: graphs read
    # them between blocks (the HF tracer's ``hidden_states.size()``).
    @property
    def shape(self) -> torch.Size:
        b, s, e = self.padded_shape
        return torch.Size((s, b, e) if self.seq_first else (b, s, e))

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return len(self.padded_shape)

    ndim = property(dim)

    @property
    def dtype(self):
        return self.nested.dtype

    @property
    def device(self):
        return self.nested.device

    def real(self) -> torch.Tensor:
        """Which positions of the padded tensor this stands for are real tokens (its layout's first two axes)."""
        return self.keep.t() if self.seq_first and self.keep is not None else self.keep

    def flat(self) -> torch.Tensor:
        return torch.cat(self.nested.unbind()) if self.nested.numel() else self.nested.values()

    def fxbt_materialize(self) -> torch.Tensor:
        if self.keep is not None:
            return self.unpack()
        return self.nested.transpose(0, 1) if self.seq_first else self.nested

    def unpack(self) -> torch.Tensor:
        b, s, e = self.padded_shape
        tokens = self.flat()
        out = tokens.new_zeros((b * s, e)).index_copy_(0, self.index, tokens).view(b, s, e)
        return out.transpose(0, 1) if self.seq_first else out


def key_padding(spec, mask_terms, x) -> torch.Tensor | None:
    """Which tokens of the block input ``x`` are real, from the model's own mask ([B, S], or [S, B] for a
    sequence-first block), or None when every token is real; UseOriginal if it is not a key-padding mask
    after all."""
    if spec.seq_first:
        keep = key_padding_of(spec.program, mask_terms, x.shape[1], x.shape[0])
        return None if keep is None else keep.t()
    return key_padding_of(spec.program, mask_terms, x.shape[0], x.shape[1])


def key_padding_of(program, mask_terms, b: int, s: int) -> torch.Tensor | None:
    try:
        mask = build_mask(program, mask_terms, torch.float32, (b, 1, s, s))
        if mask is None:
            return None
        mask = mask.expand(b, 1, s, s) if mask.dim() == 4 else mask
    except RuntimeError as e:  # the mask does not broadcast to this block's [batch, 1, seq, seq] scores
        raise UseOriginal(f"the attention mask does not fit the block's input: {e}") from None
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise UseOriginal("the attention mask differs per head")
    row = mask[:, 0, :1, :]
    if mask.shape[2] != 1 and not torch.equal(mask[:, 0], row.expand_as(mask[:, 0])):
        raise UseOriginal("the attention mask differs per query: not a key-padding mask")
    keep = row[:, 0] == 0
    if not bool(((row[:, 0] == 0) | (row[:, 0] <= MASKED)).all()):
        raise UseOriginal("the attention mask has values other than 0 and a large negative number")
    return None if bool(keep.all()) else keep


def pack(x: torch.Tensor, keep: torch.Tensor) -> Packed:
    b, s, e = x.shape
    index = keep.reshape(-1).nonzero().squeeze(1)
    tokens = x.reshape(b * s, e).index_select(0, index)
    lengths = keep.sum(1).tolist()
    return Packed(torch.nested.nested_tensor(list(tokens.split(lengths))), keep, index, (b, s, e))


# --- the replacement ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockSpec:
    heads: int
    eps: float
    activation: str  # "gelu" or "relu"
    norm_first: bool
    program: tuple  # the attention mask program (see patterns/attention.py)
    scale: float
    qkv_packed: bool = False  # the model projects Q, K and V with one [3E, E] weight (wq, wk, wv are it)
    seq_first: bool = False  # the block reads and writes [seq, batch, hidden] (PyTorch's batch_first=False)


class QKVPack:
    """One [3E, E] weight for Q, K and V, with the model's Q, K and V weights made views into it, so the
    packed weight costs no memory. If something replaces the weights' storage later (``.to()``), the
    pack is rebuilt and the views restored on the next call."""

    def __init__(self):
        self.weight = None

    def get(self, wq, wk, wv) -> torch.Tensor:
        if not self._intact(wq, wk, wv):
            # normal tensors even when called under inference_mode: they become the model's own weights
            with torch.inference_mode(False), torch.no_grad():
                packed = torch.cat([wq, wk, wv])
                n = wq.shape[0]
                for i, w in enumerate((wq, wk, wv)):
                    w.data = packed[i * n:(i + 1) * n]
            self.weight = packed
        return self.weight

    def _intact(self, wq, wk, wv) -> bool:
        w = self.weight
        if w is None or w.device != wq.device or w.dtype != wq.dtype:
            return False
        step = wq.numel() * wq.element_size()
        return all(t.data_ptr() == w.data_ptr() + i * step for i, t in enumerate((wq, wk, wv)))

    def __deepcopy__(self, memo):
        return QKVPack()  # a copy packs its own (copied) weights on first use

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.weight = None


def encoder_block(x, mask_terms=(), passed_in=(), *, wq, bq, wk, bk, wv, bv, wo, bo, g1, n1, w1, b1, w2, b2, g2, n2,
                  spec: BlockSpec, pack_qkv: QKVPack, emit_packed: bool = False, reads=(), expected=(),
                  training=False):
    if training:
        raise UseOriginal("training mode")
    if tuple(passed_in) != tuple(expected):  # an eps or scale the call passes in (torch.compile lifts them)
        raise UseOriginal("a LayerNorm eps or attention scale passed in differs from the one the block was built for")
    weights = (wq, bq, wk, bk, wv, bv, wo, bo, g1, n1, w1, b1, w2, b2, g2, n2)
    grads = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in weights + (
        x.nested if isinstance(x, Packed) else x,))
    e = x.shape[-1]
    if grads:
        raise UseOriginal("gradients needed: the fused kernel has no autograd (encoder_impl='auto' has)")
    if isinstance(x, Packed):
        packed = x
    else:
        keep = key_padding(spec, mask_terms, x)
        if spec.seq_first:  # tokens in batch-major order; the output is transposed back
            x, keep = x.transpose(0, 1), None if keep is None else keep.t()
        packed = _pack_input(x, keep, reads)
    if spec.qkv_packed:
        qkv_w, qkv_b = wq, _bias(bq, wq)
    else:  # views into one packed weight (no gradient flows: calls needing one ran the original above)
        qkv_w = pack_qkv.get(wq, wk, wv)
        qkv_b = torch.cat([_bias(bq, wq), _bias(bk, wk), _bias(bv, wv)])
    params = dict(qkv_w=qkv_w, qkv_b=qkv_b, wo=wo, bo=_bias(bo, wo), g1=_ones(g1, e, x), n1=_zeros(n1, e, x),
                  w1=w1, b1=_bias(b1, w1), w2=w2, b2=_bias(b2, w2), g2=_ones(g2, e, x), n2=_zeros(n2, e, x))
    out = _fused_block(packed, spec, params)
    out.seq_first = spec.seq_first
    if emit_packed and packed.keep is not None:
        return out
    return out.fxbt_materialize()


def _pack_input(x, keep, reads) -> Packed:
    """The block input without its padding; UseOriginal where the original's behaviour must be kept."""
    if x.numel() == 0:
        raise UseOriginal("an empty batch or sequence")
    if keep is None:
        return Packed(x, None, None, tuple(x.shape))
    if not bool(keep.any()):
        raise UseOriginal("no token is real")
    for position in reads:  # positions the stack's output is read at must be real, or they would be zeros
        if not bool(keep[:, position].all()):
            raise UseOriginal(f"position {position} is padding in some row and is read after the stack")
    return pack(x, keep)


def _bias(b, w):
    return b if isinstance(b, torch.Tensor) else w.new_zeros(w.shape[0])


def _ones(g, e, x):
    return g if isinstance(g, torch.Tensor) else torch.ones(e, dtype=x.dtype, device=x.device)


def _zeros(n, e, x):
    return n if isinstance(n, torch.Tensor) else torch.zeros(e, dtype=x.dtype, device=x.device)


def _fused_block(packed: Packed, spec: BlockSpec, p: dict) -> Packed:
    src = packed.nested
    out = torch._transformer_encoder_layer_fwd(
        src, packed.padded_shape[-1], spec.heads, p["qkv_w"], p["qkv_b"], p["wo"], p["bo"], spec.activation == "gelu",
        spec.norm_first, spec.eps, p["g1"], p["n1"], p["g2"], p["n2"], p["w1"], p["b1"], p["w2"], p["b2"], None, None)
    return Packed(out, packed.keep, packed.index, packed.padded_shape)


def link_stack(gm, installed, report) -> None:
    """Decide which blocks leave zeros at padded positions, then let each block hand its packed tokens
    straight to the next one when nothing else reads them.

    A block stays padding-free only if what reads its output's padded positions on the way to the outputs
    computes position by position, or is another padding-free block, or reads fixed positions (checked per
    call), or uses them as attention keys (checked per call against that attention's mask) (fxbt/tokens.py).
    Reverting one block can expose the padded positions of the block before it, so this runs to a fixed
    point."""
    by_node = dict(installed)
    kept, found = [node for node, _ in installed], {}
    changed = True
    while changed:
        changed = False
        for node in list(kept):
            readers = frozenset(u for u in node.users if u in kept and u.args[by_node[u].slots["x"].index] is node)
            found[node] = padded_reads(gm, node, readers, axes=(1, 0) if by_node[node].params["spec"].seq_first else (0, 1))
            if found[node].mixes:
                _revert(gm, node.target, report, f"padded positions of its output are read: {found[node].mixes}")
                kept.remove(node)
                changed = True
    following = _link(kept, by_node)
    for stack in _stacks(kept, following):
        positions = tuple(sorted({p for node in stack for p in found[node].positions}))
        for node in stack:
            by_node[node].params["reads"] = positions
            for reader, _ in found[node].attention:  # padded keys and values: the reader checks its own mask
                check_padded_keys(gm, reader, _mask_terms(node, by_node[node]),
                                  ("key_padding", by_node[node].params["spec"].program), [n.target for n in stack])


def _link(kept, by_node) -> dict:
    """Block -> the next block, where the next block alone reads its output, with the same mask."""
    following = {}
    for node in kept:
        region = by_node[node]
        users = [u for u in node.users if not is_size_query(u)]  # sizes: a packed value answers those
        if len(users) != 1 or users[0] not in kept:
            continue
        nxt_node, nxt = users[0], by_node[users[0]]
        if nxt_node.args[nxt.slots["x"].index] is not node:
            continue
        if not same_computation(_mask_terms(node, region), _mask_terms(nxt_node, nxt)) or \
                nxt.params["spec"].program != region.params["spec"].program or \
                nxt.params["spec"].seq_first != region.params["spec"].seq_first:
            continue
        region.params["emit_packed"] = True
        following[node] = nxt_node
    return following


def _stacks(kept, following) -> list[list]:
    preceded = set(following.values())
    stacks = []
    for node in kept:
        if node in preceded:
            continue
        stack = [node]
        while stack[-1] in following:
            stack.append(following[stack[-1]])
        stacks.append(stack)
    return stacks


def _revert(gm, name: str, report, why: str) -> None:
    inline_region(gm, name)
    for row in report.rows:
        if row.region == name:
            row.status, row.reason = "rejected", why


# --- the check ----------------------------------------------------------------------------------


def check_post_norm(match):
    return _check(match, norm_first=False)


def check_pre_norm(match):
    return _check(match, norm_first=True)


def _check(match, norm_first: bool):
    if origin(match.root).graph.owning_module.training:  # the block would run its original on every call
        return Decline("training mode: the block runs its original (the padding-free pass may take the stack)")
    g = match.graph
    b = match.bindings
    x = b["x"]
    xv = val(origin(x)) if not isinstance(x, Const) else None
    if not isinstance(xv, TensorInfo) or xv.ndim != 3 or not isinstance(sym(origin(x)), tuple):
        return Decline("the block input is not a [batch, sequence, hidden] tensor")
    e = number(sym(origin(x))[-1])
    if e is None:
        return Decline("the hidden size is not fixed")
    attention = _attention_region(match)
    if isinstance(attention, Decline):
        return attention
    node, region = attention
    reason = _check_attention(region, e)
    if reason:
        return Decline(reason)
    norms = sorted((k for k in match.keys if g.op(k) == "layer_norm"), key=lambda k: origin(k).meta["fxbt_pos"])
    layout = _check_layouts(match, e, norms, norm_first)
    if isinstance(layout, Decline):
        return layout
    n_heads, seq_first = layout
    scale, passed_in = _scale(node, region)
    if scale == "varies":
        return Decline("attention scale is computed at run time from sizes that can change")
    if scale is not None and not math.isclose(scale, 1.0 / math.sqrt(e // n_heads), rel_tol=1e-6):
        return Decline(f"attention scale {scale:.6g} is not 1/sqrt(head size) = {1 / math.sqrt(e // n_heads):.6g}")
    if _per_head_mask(node, region):
        return Decline("the mask differs per head (a position bias?): not a key-padding mask")
    linear1, activation, act_nodes = _feed_forward(match, norms, norm_first)
    if isinstance(activation, Decline):
        return activation
    if activation not in ("gelu", "relu"):
        return Decline(activation)
    second_norm = _second_norm(g, linear1) if norm_first else None
    all_norms = norms + ([second_norm] if second_norm is not None else [])
    eps = {_value_or_passed_in(g.canon(k).attrs.get("eps"), passed_in) for k in all_norms}
    if "varies" in eps:
        return Decline("a LayerNorm eps is computed from sizes")
    if len(eps) != 1:
        return Decline(f"the two LayerNorm eps differ ({', '.join(map(str, sorted(eps)))})")
    if any(tuple(val(origin(k)).shape[-1:]) != (e,) for k in all_norms):
        return Decline("a LayerNorm does not normalise the hidden size")
    weights = _weights(match, linear1, all_norms, norm_first)
    if isinstance(weights, Decline):
        return weights
    spec = BlockSpec(n_heads, float(eps.pop()), activation, norm_first, _mask_program(node, region),
                     1.0 / math.sqrt(e // n_heads), qkv_packed(weights), seq_first)
    inputs = {"x": x, "mask_terms": _mask_terms(node, region), "passed_in": tuple(passed_in)}
    inputs.update(weights)
    absorb = tuple(act_nodes) + (linear1,) + ((second_norm,) if second_norm is not None else ())
    note = "the original runs in training mode and when gradients are needed"
    params = {"spec": spec, "pack_qkv": QKVPack(), "expected": tuple(val(n) for n in passed_in)}
    return Accept(inputs, params, absorb=absorb, note=note, impl="fused")


def _attention_region(match):
    g = match.graph
    key = next(k for k in match.keys if g.op(k) == "sdpa")
    name = g.canon(key).attrs.get("region")
    if name is None:
        return Decline("attention is an SDPA call that was not recognised as attention")
    return origin(key), g.gm.get_submodule(name)


def _check_attention(region, e) -> str | None:
    p = region.params
    if region.rule == "existing_sdpa":
        if p["is_causal"]:
            return "attention is causal: an encoder block attends to every token"
        if p["enable_gqa"]:
            return "grouped-query attention: the fused kernel needs one key head per query head"
        return None
    if p.get("k_transposed") or p.get("gqa"):
        return "keys are not in the [batch, heads, seq, head] layout the fused kernel reads"
    if p.get("causal"):
        return "attention is causal: an encoder block attends to every token"
    if any(step[0] == "reshape" for step in p.get("program", ())):
        return "the mask is reshaped with the scores"
    return None


def _value_or_passed_in(value, passed_in: list):
    """A constant, or a graph scalar: its one value (fixed by the weights), or "varies" (it reads a size), or the
    example's value with the node added to ``passed_in`` (a module attribute torch.compile lifts to an input)."""
    if not isinstance(value, torch.fx.Node):
        return value
    if fixed(value) is not None:
        return fixed(value)
    if depends_on_sizes(value):
        return "varies"
    passed_in.append(value)
    return val(value)


def _scale(node, region):
    """The attention's scale on the example (None: SDPA's default) and the terms of it a call passes in.

    A term is a number where only sizes the weights fix go into it; "varies" where it reads a size that can
    change (the sequence length); passed in where it is a value (a module attribute torch.compile lifts to an
    input), which the block checks against the example's on every call."""
    scale, powers = region.params.get("scale"), region.params.get("scale_powers", ())
    terms = region.slots["scale_terms"].args_of(node) if powers else ()
    passed_in = []
    for term, power in zip(terms, powers):
        value = _value_or_passed_in(term, passed_in)
        if value == "varies":
            return "varies", []
        scale = (1.0 if scale is None else scale) * value ** power
    return scale, passed_in


def _per_head_mask(node, region) -> bool:
    """A mask term that may have a head dimension: a position bias, not a key-padding mask. With [b, h, q, k]
    scores a term's head axis is its third from last, whatever its rank (MPT adds ALiBi as [h, 1, k])."""
    q = region.slots["q"].args_of(node)[0]
    if not isinstance(q, torch.fx.Node) or not isinstance(sym(q), tuple) or len(sym(q)) != 4:
        return False  # [b·h, q, k] scores: no axis of a term is the heads alone
    for term in _mask_terms(node, region):
        shape = sym(term) if isinstance(term, torch.fx.Node) else None
        if isinstance(shape, tuple) and len(shape) >= 3 and shape[-3] != 1:
            return True
    return False


def _mask_program(node, region) -> tuple:
    """The attention's mask as a mask program; an SDPA call's mask is one boolean or additive term."""
    if region.rule != "existing_sdpa":
        return region.params.get("program", ())
    mask = _mask_terms(node, region)
    if not mask:
        return ()
    info = val(mask[0])
    return (("keep", ("term", 0), float("-inf")),) if info.dtype == torch.bool else (("add", ("term", 0), 1.0),)


def _mask_terms(node, region):
    """The mask inputs of a region's call: an SDPA call's one mask, or a mask program's terms."""
    return region.slots["mask" if "mask" in region.slots else "mask_terms"].args_of(node)


def _check_layouts(match, e: int, norms: list, norm_first: bool):
    """(how many heads the block has, whether its input is [seq, batch, hidden]), or why its layout is not
    the fused kernel's: Q, K and V must be the standard head split of the hidden states ([batch, heads, seq,
    head], or [batch·heads, seq, head] for bmm), Q, K and V from one packed projection its first, second and
    third part (the fused kernel's order), and the output the standard merge, back in the block input's
    layout. Proven by replaying the layout ops on numbered tokens (fxbt/layout.py), whatever ops the model
    spells them with."""
    g = match.graph
    x = match.bindings["x"]
    sdpa = next(k for k in match.keys if g.op(k) == "sdpa")
    operands = g.operands(sdpa)[:3]
    d = number(sym(origin(operands[0]))[-1]) if isinstance(sym(origin(operands[0])), tuple) else None
    if not d or e % d:
        return Decline("the head size is not fixed, or does not divide the hidden size")
    heads_count = e // d
    first, second = sym(origin(x))[:2]
    shapes = [sym(origin(o)) for o in operands]
    # [batch, seq, hidden], or PyTorch's default [seq, batch, hidden]; replay tells them apart where the
    # example's batch and sequence sizes are the same number
    orders = [seq_first for seq_first, (b, s) in ((False, (first, second)), (True, (second, first)))
              if all(_heads_layout(t, b, s, heads_count, d) for t in shapes)]
    if not orders:
        return Decline("query, key and value are not [batch, heads, seq, head] splits of the hidden size")
    verdicts = [_check_order(match, operands, e, norms, norm_first, heads_count, seq_first) for seq_first in orders]
    return next((v for v in verdicts if not isinstance(v, Decline)), verdicts[0])


def _check_order(match, operands, e, norms, norm_first, heads_count, seq_first):
    g, x = match.graph, match.bindings["x"]
    sdpa = next(k for k in match.keys if g.op(k) == "sdpa")
    source = x if not norm_first else norms[0]  # what the projections read: the input, or its LayerNorm
    in_x = numbered(val(origin(x)).shape[:2])  # each token's flat index, laid out as in the block input
    tokens = in_x.transpose(0, 1) if seq_first else in_x  # the same, [batch, seq]
    parts = []
    for operand in operands:
        part = _projection_part(g, operand, source, in_x, tokens, e, heads_count)
        if isinstance(part, Decline):
            return part
        parts.append(part)
    if parts != [0, 0, 0] and parts != [0, 1, 2]:
        return Decline("Q, K and V are packed in one projection in another order than the fused kernel's (per head?)")
    return _merge_back(match, sdpa, in_x, tokens, e, heads_count) or (heads_count, seq_first)


def _heads_layout(shape, b, s, heads_count, d) -> bool:
    """[b, heads, s, d], or [b·heads, s, d] (bmm over batch and heads), for every admitted size."""
    return isinstance(shape, tuple) and (same(shape, (b, heads_count, s, d)) or same(shape, (b * heads_count, s, d)))


def _standard_split(tokens, width, part, e, heads_count, shape):
    """The numbered elements of part ``part`` of a [b, s, width] projection of ``tokens``, split into heads."""
    b, s = tokens.shape
    features = tokens[..., None] * width + part * e + torch.arange(e)
    return features.reshape(b, s, heads_count, e // heads_count).transpose(1, 2).reshape(shape)


def _projection_part(g, operand, source, in_x, tokens, e, heads_count):
    """Which part of its projection Q, K or V is (0 for an unpacked one), proven by replay; or a Decline."""
    post, linear = path_down(g, operand, lambda k: g.op(k) == "linear")
    if isinstance(linear, Const) or g.op(linear) != "linear":
        op = "const" if isinstance(linear, Const) else g.op(linear)
        if op in ("mul", "add", "sub", "neg", "cat"):
            return Decline("a position encoding (rotary?) is applied to the queries or keys inside the block")
        return Decline("heads are split or merged in a non-standard order")
    pre, found = path_down(g, g.operands(linear)[0], lambda k: k is source)
    width = number(sym(origin(linear))[-1]) if isinstance(sym(origin(linear)), tuple) else None
    if found is not source or not width or width % e:
        return Decline("heads are split or merged in a non-standard order")
    rows = replay(g, pre, (in_x[..., None] * e + torch.arange(e)))  # the projection's input, row by row
    rows = token_rows(rows, e) if rows is not None else None
    value = replay(g, post, rows[..., None] * width + torch.arange(width)) if rows is not None else None
    if value is None:
        return Decline("heads are split or merged in a non-standard order")
    for part in range(width // e):
        if torch.equal(value, _standard_split(tokens, width, part, e, heads_count, value.shape)):
            return part
    return Decline("Q, K and V are packed in one projection in another order than the fused kernel's (per head?)"
                   if width != e else "heads are split or merged in a non-standard order")


def _merge_back(match, sdpa, in_x, tokens, e, heads_count) -> Decline | None:
    """The attention output merged back to the hidden size, projected, and put back in the block input's
    layout (added to it as the residual), proven by replay."""
    g = match.graph
    linears = [k for k in match.keys if g.op(k) == "linear"]
    for linear in linears:
        pre, found = path_down(g, g.operands(linear)[0], lambda k: k == sdpa)
        if found != sdpa:
            continue
        add = next((k for k in match.keys if g.op(k) == "add" and any(
            path_down(g, o, lambda k, lin=linear: k == lin)[1] == linear for o in g.operands(k))), None)
        if add is None:
            break
        other = next(o for o in g.operands(add) if path_down(g, o, lambda k, lin=linear: k == lin)[1] == linear)
        post, _ = path_down(g, other, lambda k, lin=linear: k == lin)
        out_shape = tuple(val(origin(sdpa)).shape)
        start = (tokens[..., None] * e + torch.arange(e)).reshape(*tokens.shape, heads_count, e // heads_count)
        merged = replay(g, pre, start.transpose(1, 2).reshape(out_shape))
        rows = token_rows(merged, e) if merged is not None else None
        result = replay(g, post, rows[..., None] * e + torch.arange(e)) if rows is not None else None
        if result is not None and torch.equal(result, in_x[..., None] * e + torch.arange(e)):
            return None
        break
    return Decline("heads are split or merged in a non-standard order")


def _feed_forward(match, norms, norm_first):
    """Find the first feed-forward linear and read the activation between it and the second linear."""
    g = match.graph
    act = match.bindings["act"]
    if isinstance(act, Const):
        return None, Decline("the feed-forward input is a constant"), []
    h_input = _ffn_input(match, norms, norm_first)
    path, node = [], origin(act)
    frontier, seen = [node], set()
    linear1 = None
    while frontier:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        if g.op(n) == "linear" and _reads(g, n, h_input, norm_first):
            linear1 = n
            continue
        if g.op(n) == "sdpa":
            return None, Decline("a second attention (cross-attention) comes before the feed-forward: "
                                 "a decoder block, not an encoder block"), []
        if len(seen) > 24 or n.op in ("placeholder", "get_attr"):
            return None, Decline("the feed-forward's first linear layer was not found"), []
        path.append(n)
        frontier.extend(a for a in n.all_input_nodes if g.op(a) not in ("param", "input") or a is h_input)
    if linear1 is None:
        return None, Decline("the feed-forward's first linear layer was not found"), []
    inside = set(path) | {linear1} | match.nodes()
    if any(u not in inside for n in path + [linear1] for u in n.users):
        return None, Decline("the feed-forward's hidden activations are also used outside the block"), []
    return linear1, _activation(g, path), path


def _ffn_input(match, norms, norm_first):
    g = match.graph
    if norm_first:  # h = attention + x: the root's other operand
        root_operands = g.operands(match.root)
        return next(o for o in root_operands if not isinstance(o, Const) and g.op(o) == "add")
    return norms[0]  # post-norm: h is the first LayerNorm's output


def _reads(g, linear, h, norm_first) -> bool:
    x = g.operands(linear)[0]
    x, _ = g.through_transparent(x)
    if not norm_first:
        return x is h
    return not isinstance(x, Const) and g.op(x) == "layer_norm" and g.through_transparent(g.operands(x)[0])[0] is h


def _second_norm(g, linear1):
    x, _ = g.through_transparent(g.operands(linear1)[0])
    return x


def _activation(g, path) -> str:
    ops = [g.op(n) for n in path if g.op(n) not in ("dropout", "contiguous", "clone", "identity")]
    if ops == ["gelu"]:
        node = next(n for n in path if g.op(n) == "gelu")
        approx = g.canon(node).attrs.get("approximate", "none")
        return "gelu" if approx == "none" else f"activation is gelu with approximate={approx!r}, not the exact (erf) gelu"
    if ops == ["relu"]:
        return "relu"
    if "tanh" in ops:
        return "activation is the tanh approximation of gelu, not the exact (erf) gelu"
    if "sigmoid" in ops and "mul" in ops:
        return "activation is quick-gelu (x * sigmoid(1.702 x)), not gelu or relu"
    if ops == ["silu"]:
        return "activation is silu, not gelu or relu"
    return f"activation ({' -> '.join(reversed(ops))}) is not gelu or relu"


def _weights(match, linear1, norms, norm_first):
    g = match.graph
    b = match.bindings
    found = {k: b[k] for k in ("wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "g1", "n1", "w2", "b2")}
    if norm_first:
        second = norms[-1]
        found["g2"], found["n2"] = g.operands(second)[1], g.operands(second)[2]
    else:
        found["g2"], found["n2"] = b["g2"], b["n2"]
    w1_ops = g.operands(linear1)
    found["w1"], found["b1"] = w1_ops[1], w1_ops[2]
    linears = [k for k in match.keys if g.op(k) == "linear"] + [linear1]
    if any(g.canon(k).attrs.get("weight_layout") != "out_in" for k in linears):
        return Decline("a projection stores its weight as [in, out] (Conv1D)")
    tensors = {k: _tensor_value(g, v) for k, v in found.items()}
    e = _shape(tensors["wq"])[-1] if tensors["wq"] is not None else None
    qkv_rows = 3 * e if qkv_packed(found) else e
    for name in ("wq", "wk", "wv", "wo"):
        if _shape(tensors[name]) != (e if name == "wo" else qkv_rows, e):
            return Decline(f"projection {name} is not [{'3 × ' if qkv_rows != e else ''}hidden, hidden]")
    f = _shape(tensors["w1"])
    if len(f) != 2 or f[1] != e or _shape(tensors["w2"]) != (e, f[0]):
        return Decline("the feed-forward weights do not fit the hidden size")
    if len({(t.dtype, t.device) for t in tensors.values() if isinstance(t, (torch.Tensor, TensorInfo))}) > 1:
        return Decline("the block's weights differ in dtype or device")
    return found


def qkv_packed(weights: dict) -> bool:
    """Q, K and V come from one projection: the three weights are the same tensor."""
    wq, wk, wv = (w.value if isinstance(w, Const) else w for w in (weights["wq"], weights["wk"], weights["wv"]))
    return wq is wk is wv


def _tensor_value(g, v):
    if isinstance(v, Const):
        return v.value
    info = val(origin(v))
    return info if isinstance(info, TensorInfo) else None


def _shape(t) -> tuple:
    return tuple(t.shape) if isinstance(t, (torch.Tensor, TensorInfo)) else ()


RULES = [
    Rule("post_norm_encoder_block", post_norm_encoder_block, encoder_block, check_post_norm, kernel="fused_encoder",
         priority=1, after_pass=link_stack, enabled=asked_for),
    Rule("pre_norm_encoder_block", pre_norm_encoder_block, encoder_block, check_pre_norm, kernel="fused_encoder",
         priority=1, after_pass=link_stack, enabled=asked_for),
]
