"""PyTorch's own attention, seen as what it computes.

Dynamo keeps ``F.multi_head_attention_forward`` as one call (``nn.MultiheadAttention``, the slow path of
``nn.TransformerEncoderLayer`` and ``nn.Transformer``, torchvision's ViT, open_clip's towers), and plain fx
keeps ``nn.MultiheadAttention`` as one module call. Neither shows the projections, the mask or the
attention inside, so no rule could see them. `decompose` replaces each such call by the ops PyTorch's own
implementation runs for it: the same functions, in the same order, on the same arguments (torch 2.13's
``torch/nn/functional.py``), so the graph still computes the model bit for bit and capture's reproduction
check holds it to that. What the call's Python code decides from ranks, dtypes and tensor identity
(a batched input, a boolean mask, ``query is key``) is read off the example: ranks and dtypes are part of
every graph's guard, and identity is the graph's own (one node, one tensor).

A combination the decomposition does not write out stays one call, and the node says why
(``meta["fxbt_opaque_attention"]``, shown in the report): attention weights that are returned and used,
``bias_k``/``bias_v``, ``add_zero_attn``, ``static_k``/``static_v``.

PyTorch's fast paths (``torch._native_multi_head_attention``, ``torch._transformer_encoder_layer_fwd`` on
nested tensors) are kept out of capture altogether: capture runs with ``torch.backends.mha`` fast paths
off (`fast_path_off`), so ``nn.TransformerEncoder`` and ``nn.Transformer`` are traced through their slow,
explicit path.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import operator

import torch
import torch.fx
import torch.nn.functional as F

from .meta import TensorInfo

OPAQUE = "fxbt_opaque_attention"  # node meta: why an attention call was left whole
_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
_MODULE_SIGNATURE = inspect.signature(torch.nn.MultiheadAttention.forward)


@contextlib.contextmanager
def fast_path_off():
    """PyTorch's MHA fast paths off for the duration (process-wide: captures are serialised by capture.LOCK)."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def candidates(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The calls of PyTorch's multi-head attention in ``gm`` (function calls and fx's module calls)."""
    return [n for n in gm.graph.nodes if _is_function_call(n) or _is_module_call(gm, n)]


def _is_function_call(node) -> bool:
    return node.op == "call_function" and node.target is F.multi_head_attention_forward


def _is_module_call(gm, node) -> bool:
    if node.op != "call_module":
        return False
    module = gm.get_submodule(node.target)
    return isinstance(module, torch.nn.MultiheadAttention) and \
        type(module).forward is torch.nn.MultiheadAttention.forward


def decompose(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Write out every call `candidates` finds whose arguments are supported; return the new nodes.

    Needs each argument's ``meta["fxbt_val"]`` (fxbt.meta.propagate on the example). A call left whole
    gets ``meta[OPAQUE]``: the reason."""
    added: list[torch.fx.Node] = []
    for node in candidates(gm):
        call = _bind(gm, node)
        reason = _unsupported(node, call)
        if reason:
            node.meta[OPAQUE] = reason
            continue
        before = set(gm.graph.nodes)
        _write_out(gm, node, call)
        added.extend(n for n in gm.graph.nodes if n not in before)
    if added:
        gm.graph.eliminate_dead_code()
        live = set(gm.graph.nodes)
        added = [n for n in added if n in live]
        gm.graph.lint()
        gm.recompile()
    return added


# --- reading a call ----------------------------------------------------------------------------------


class _Call(dict):
    """A call's arguments by name (F.multi_head_attention_forward's), and how the module call got them."""

    module: torch.nn.MultiheadAttention | None = None
    prefix: str = ""


def _bind(gm, node) -> _Call:
    if node.op == "call_function":
        bound = _MHA_SIGNATURE.bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        return _Call(bound.arguments)
    module = gm.get_submodule(node.target)
    bound = _MODULE_SIGNATURE.bind(module, *node.args, **node.kwargs)
    bound.apply_defaults()
    call = _Call(bound.arguments)
    del call["self"]
    call.module, call.prefix = module, node.target
    return call


def _unsupported(node, call: _Call) -> str | None:
    """Why this call stays whole, or None."""
    module = call.module
    fields = {"bias_k": module.bias_k, "add_zero_attn": module.add_zero_attn} if module is not None else call
    if fields["bias_k"] is not None or (module is None and call["bias_v"] is not None):
        return "PyTorch multi-head attention with bias_k/bias_v (an extra learned key and value) is kept as one call"
    if fields["add_zero_attn"]:
        return "PyTorch multi-head attention with add_zero_attn is kept as one call"
    if module is None and (call["static_k"] is not None or call["static_v"] is not None):
        return "PyTorch multi-head attention with static_k/static_v is kept as one call"
    if call["need_weights"] and _weights_used(node):
        return ("PyTorch multi-head attention returns its attention weights (need_weights=True) and they are used: "
                "SDPA does not compute them; kept as one call")
    if call["is_causal"] and call["attn_mask"] is None:
        return "is_causal without attn_mask: PyTorch raises on this call"
    if any(u.op != "call_function" or u.target is not operator.getitem or not isinstance(u.args[1], int)
           for u in node.users):
        return "the result of PyTorch multi-head attention is used other than by taking its two parts"
    for name in ("query", "key", "value", "key_padding_mask", "attn_mask"):
        value = call[name]
        if value is not None and not isinstance(_info(value), TensorInfo):
            return f"the {name} of PyTorch multi-head attention has no recorded value"
    if call["query"] is not None and _info(call["query"]).ndim not in (2, 3):
        return "the query of PyTorch multi-head attention is neither batched (3-d) nor unbatched (2-d)"
    return None


def _weights_used(node) -> bool:
    return any(u.args[1] == 1 and u.users for u in node.users
               if u.op == "call_function" and u.target is operator.getitem)


def _info(value):
    return value.meta.get("fxbt_val") if isinstance(value, torch.fx.Node) else value


# --- writing it out -----------------------------------------------------------------------------------


class _Facts:
    """What the Python code of an attention call decides from, read off the example: ranks and dtypes of
    the call's arguments, and of the values the written-out code makes from them."""

    def __init__(self):
        self.known: dict[int, tuple] = {}  # id of a proxy -> (dtype, rank)

    def learn(self, proxy, dtype, rank):
        self.known[id(proxy)] = (dtype, rank)
        return proxy

    def like(self, proxy, other, rank=None):
        dtype, other_rank = self.known[id(other)]
        return self.learn(proxy, dtype, other_rank if rank is None else rank)

    def rank(self, x) -> int:
        return self.known[id(x)][1]

    def is_float(self, x) -> bool:
        return self.known[id(x)][0].is_floating_point

    def dtype(self, x):
        return self.known[id(x)][0]


def _write_out(gm, node, call: _Call) -> None:
    graph = gm.graph
    tracer = torch.fx.proxy.GraphAppendingTracer(graph)
    proxies: dict[torch.fx.Node, torch.fx.Proxy] = {}

    def proxy(x):
        if isinstance(x, torch.fx.Node):
            return proxies.setdefault(x, torch.fx.Proxy(x, tracer))
        return x

    with graph.inserting_before(node):
        args = {k: proxy(v) for k, v in call.items()}
        if call.module is not None:
            for name in ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                         "out_proj.weight", "out_proj.bias"):
                owner, _, attr = f"{call.prefix}.{name}".rpartition(".")
                if getattr(gm.get_submodule(owner), attr) is not None:
                    attr_node = graph.get_attr(f"{call.prefix}.{name}")
                    attr_node.meta["fxbt_val"] = _describe(getattr(gm.get_submodule(owner), attr))
                    args[name] = proxy(attr_node)
                else:
                    args[name] = None
        facts = _Facts()
        for node_, p in proxies.items():
            info = node_.meta.get("fxbt_val")
            if isinstance(info, TensorInfo):
                facts.learn(p, info.dtype, info.ndim)
        if call.module is not None:
            out, weights = module_forward(call.module, args, facts)
        else:
            out, weights = multi_head_attention_forward(args, facts)
    for user in list(node.users):
        part = out if user.args[1] == 0 else weights
        if isinstance(part, torch.fx.Proxy):
            user.replace_all_uses_with(part.node)
            graph.erase_node(user)
        elif not user.users:
            graph.erase_node(user)
    graph.erase_node(node)


def _describe(t):
    from .meta import describe

    return describe(t, False)


def module_forward(m: torch.nn.MultiheadAttention, a: dict, facts: _Facts):
    """``nn.MultiheadAttention.forward``'s slow path: masks made additive, batch-first inputs transposed."""
    query, key, value = a["query"], a["key"], a["value"]
    is_batched = facts.rank(query) == 3
    key_padding_mask = _canonical_mask(a["key_padding_mask"], facts.dtype(query), facts)
    attn_mask = _canonical_mask(a["attn_mask"], facts.dtype(query), facts)
    if m.batch_first and is_batched:
        if key is value:
            if query is key:
                query = key = value = facts.like(query.transpose(1, 0), query)
            else:
                query, key = (facts.like(x.transpose(1, 0), x) for x in (query, key))
                value = key
        else:
            query, key, value = (facts.like(x.transpose(1, 0), x) for x in (query, key, value))
    call = {"query": query, "key": key, "value": value, "embed_dim_to_check": m.embed_dim,
            "num_heads": m.num_heads, "in_proj_weight": a["in_proj_weight"], "in_proj_bias": a["in_proj_bias"],
            "dropout_p": m.dropout, "out_proj_weight": a["out_proj.weight"], "out_proj_bias": a["out_proj.bias"],
            "training": m.training, "key_padding_mask": key_padding_mask, "need_weights": a["need_weights"],
            "attn_mask": attn_mask, "use_separate_proj_weight": not m._qkv_same_embed_dim,
            "q_proj_weight": a["q_proj_weight"], "k_proj_weight": a["k_proj_weight"],
            "v_proj_weight": a["v_proj_weight"], "average_attn_weights": a["average_attn_weights"],
            "is_causal": a["is_causal"]}
    out, weights = multi_head_attention_forward(call, facts)
    if m.batch_first and is_batched:
        out = out.transpose(1, 0)
    return out, weights


def _canonical_mask(mask, dtype, facts):
    """``F._canonical_mask``: a boolean mask becomes an additive one (-inf where True)."""
    if mask is None or facts.is_float(mask):
        return mask
    return facts.learn(torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf")), dtype, facts.rank(mask))


def multi_head_attention_forward(a: dict, facts: _Facts):
    """``F.multi_head_attention_forward`` written out (torch 2.13), for the arguments `_unsupported` admits.
    Returns (output, averaged weights or None)."""
    query, key, value = a["query"], a["key"], a["value"]
    num_heads, need_weights, is_causal = a["num_heads"], a["need_weights"], a["is_causal"]
    query_rank, dtype = facts.rank(query), facts.dtype(query)
    key_padding_mask, attn_mask = a["key_padding_mask"], a["attn_mask"]
    is_batched = query_rank == 3
    if not is_batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz = query.size(0), query.size(1)
    embed_dim = a["embed_dim_to_check"]
    key_padding_mask = _canonical_mask(key_padding_mask, dtype, facts)
    mask_rank = facts.rank(attn_mask) if attn_mask is not None else None
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None
    else:
        attn_mask = _canonical_mask(attn_mask, dtype, facts)
        if key_padding_mask is not None:
            is_causal = False
    head_dim = embed_dim // num_heads
    if not a["use_separate_proj_weight"]:
        q, k, v = _in_projection_packed(query, key, value, a["in_proj_weight"], a["in_proj_bias"], embed_dim)
    else:
        bias = a["in_proj_bias"]
        b_q, b_k, b_v = (None, None, None) if bias is None else bias.chunk(3)
        q, k, v = (F.linear(query, a["q_proj_weight"], b_q), F.linear(key, a["k_proj_weight"], b_k),
                   F.linear(value, a["v_proj_weight"], b_v))
    if attn_mask is not None and mask_rank == 2:
        attn_mask = attn_mask.unsqueeze(0)
    src_len = k.size(0)
    if key_padding_mask is not None:
        key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
                            .reshape(bsz * num_heads, 1, src_len))
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        mask_rank = 3
    dropout_p = a["dropout_p"] if a["training"] else 0.0
    if need_weights:
        q, k, v = (x.view(x.size(0), bsz * num_heads, head_dim).transpose(0, 1) for x in (q, k, v))
        return _explicit_attention(q, k, v, attn_mask, dropout_p, head_dim, tgt_len, bsz, src_len, embed_dim,
                                   num_heads, a, is_batched)
    if attn_mask is not None:
        # torch: (1, L, S) masks are unsqueezed, others viewed as (bsz, heads, -1, S); equal values either way
        unsqueezed = mask_rank == 2 and a["key_padding_mask"] is None
        attn_mask = attn_mask.unsqueeze(0) if unsqueezed else attn_mask.view(bsz, num_heads, -1, src_len)
    # [L, bsz, E] -> [bsz, heads, L, head_dim]: the very view torch reaches through [bsz·heads, L, head_dim], written
    # with the batch and sequence axes apart (so a padding-free pass can follow them), the same on the way out
    q, k, v = (x.view(x.size(0), bsz, num_heads, head_dim).permute(1, 2, 0, 3) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, embed_dim)
    out = F.linear(out, a["out_proj_weight"], a["out_proj_bias"])
    if not is_batched:
        out = out.squeeze(1)
    return out, None


def _in_projection_packed(q, k, v, w, b, embed_dim):
    if k is v:
        if q is k:
            proj = F.linear(q, w, b)
            proj = proj.unflatten(-1, (3, embed_dim)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            return proj[0], proj[1], proj[2]
        w_q, w_kv = w.split([embed_dim, embed_dim * 2])
        b_q, b_kv = (None, None) if b is None else b.split([embed_dim, embed_dim * 2])
        q_proj = F.linear(q, w_q, b_q)
        kv_proj = F.linear(k, w_kv, b_kv)
        kv_proj = kv_proj.unflatten(-1, (2, embed_dim)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        return q_proj, kv_proj[0], kv_proj[1]
    w_q, w_k, w_v = w.chunk(3)
    b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
    return F.linear(q, w_q, b_q), F.linear(k, w_k, b_k), F.linear(v, w_v, b_v)


def _explicit_attention(q, k, v, attn_mask, dropout_p, head_dim, tgt_len, bsz, src_len, embed_dim, num_heads, a,
                        is_batched):
    """The ``need_weights=True`` path (its weights unused): softmax attention written out, with bmm."""
    q_scaled = q * math.sqrt(1.0 / float(head_dim))
    if attn_mask is not None:
        weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
    else:
        weights = torch.bmm(q_scaled, k.transpose(-2, -1))
    weights = F.softmax(weights, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    out = torch.bmm(weights, v)
    out = out.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
    out = F.linear(out, a["out_proj_weight"], a["out_proj_bias"])
    out = out.view(tgt_len, bsz, out.size(1))
    if not is_batched:
        out = out.squeeze(1)
    return out, None


def fake_values(gm: torch.fx.GraphModule, added: list[torch.fx.Node]) -> None:
    """Dynamo's symbolic fake value (``meta["example_value"]``) for each node `decompose` added, computed
    from its arguments' under the graph's own fake mode, so the new nodes carry symbolic sizes like the rest."""
    fakes = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
    mode = next((x.fake_mode for x in fakes if hasattr(x, "fake_mode")), None)
    if mode is None:
        return
    from torch._dispatch.python import enable_python_dispatcher

    value = lambda n: n.meta["example_value"]  # noqa: E731
    with mode, enable_python_dispatcher():
        for node in added:
            args = torch.fx.node.map_arg(node.args, value)
            kwargs = torch.fx.node.map_arg(node.kwargs, value)
            if node.op == "get_attr":
                tensor = _fetch(gm, node.target)
                node.meta["example_value"] = mode.from_tensor(tensor, static_shapes=True)
            elif node.op == "call_method":
                node.meta["example_value"] = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                node.meta["example_value"] = node.target(*args, **kwargs)


def _fetch(gm, target):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
