"""Attention that does not come from transformers: PyTorch's own modules (nn.MultiheadAttention,
nn.TransformerEncoderLayer / Encoder, nn.Transformer) in every configuration, and the styles of timm,
torchvision, open_clip and x-transformers, written here in plain PyTorch (tiny sizes).

Each test checks the rewrite (report rows), numbers on real tokens against the model's own forward at
other sizes than the example, and that unroll gives back the captured graph; near-miss twins must keep
their reason."""
from __future__ import annotations


import math

import pytest
import torch
import torch.nn as nn

import fxbt
from conftest import identical
from fxbt.decompose import fast_path_off
from fxbt.region import regions

E, H, FF, TOL = 16, 2, 32, 1e-5


def padding(batch, seq, seed=0):
    """A boolean key-padding mask (True = padding), PyTorch's convention: row 0 full, others shorter."""
    g = torch.Generator().manual_seed(seed)
    lengths = [seq] + torch.randint(1, max(seq, 2), (batch - 1,), generator=g).tolist()
    return torch.arange(seq)[None, :] >= torch.tensor(lengths)[:, None]


def tokens(batch, seq, batch_first=True, seed=0):
    x = torch.randn(batch, seq, E, generator=torch.Generator().manual_seed(seed))
    return x if batch_first else x.transpose(0, 1).contiguous()


def real_error(want, got, pad=None, batch_first=True) -> float:
    """Max abs difference over real tokens (a padding-free block leaves zeros at padded positions)."""
    diff = (want.float() - got.float()).abs()
    if pad is not None:
        keep = ~pad if batch_first else ~pad.t()
        diff = diff[keep]
    return diff.max().item()


def original(model, *args, **kwargs):
    """The model's own forward along the path fxbt captures (PyTorch's fast paths off): what unroll equals."""
    with torch.no_grad(), fast_path_off():
        return model(*args, **kwargs)


def style_row(record, style, gm, errors) -> None:
    """A row of the README's "not from transformers" table (tests/model_table.py)."""
    import transformers

    report = fxbt.report(gm).reports[-1]  # the example's graph (calls at other sizes may have made more)
    record({"style": style, "transformers": transformers.__version__, "frontend": report.frontend,
            "sdpa": len(report.rewritten("sdpa")), "fused": len(report.rewritten("fused_encoder")),
            "padding_free": len(report.rewritten("padding_free")), "max_err": max(errors)})


def rows(gm, kernel, status="rewritten"):
    report = fxbt.report(gm)
    return report.rewritten(kernel) if status == "rewritten" else report.rejected(kernel)


# --- nn.TransformerEncoderLayer / nn.TransformerEncoder --------------------------------------------


def encoder(batch_first, norm_first, layers=2, activation="relu"):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, FF, dropout=0.1, activation=activation, batch_first=batch_first,
                                       norm_first=norm_first)
    return nn.TransformerEncoder(layer, layers).eval()  # enable_nested_tensor (the nested fast path) on


@pytest.mark.parametrize("batch_first, norm_first, impl", [
    (True, False, "auto"), (True, True, "auto"), (False, False, "auto"), (False, True, "auto"),
    (False, False, "fused"), (True, True, "fused")],
    ids=["batch_first-post_norm", "batch_first-pre_norm", "seq_first-post_norm", "seq_first-pre_norm",
         "seq_first-post_norm-fused", "batch_first-pre_norm-fused"])
def test_transformer_encoder_runs_on_real_tokens(batch_first, norm_first, impl, record_model_row):
    """By default the stack runs padding-free on PyTorch's own ops; encoder_impl="fused" puts each block on the
    fused encoder kernel instead, padding removed across the stack either way."""
    model = encoder(batch_first, norm_first)
    example = {"src": tokens(2, 5, batch_first), "src_key_padding_mask": padding(2, 5)}
    gm = fxbt.optimize(model, example, inplace=False, encoder_impl=impl)
    report = fxbt.report(gm)
    assert len(report.rewritten("sdpa")) == 2, str(report)
    if impl == "fused":
        assert len(report.rewritten("fused_encoder")) == 2, str(report)
        fused = [r for _, r in regions(fxbt.api.graph_module(gm)) if r.kernel == "fused_encoder"]
        assert len(fused) == 2 and all(r.params["spec"].seq_first is not batch_first for r in fused)
    else:
        stacks = report.rewritten("padding_free")
        assert len(stacks) == 1 and "2 attentions" in stacks[0].reason, str(report)
    errors = []
    for batch, seq in [(3, 7), (1, 4)]:
        x, pad = tokens(batch, seq, batch_first, seed=seq), padding(batch, seq, seed=seq)
        with torch.no_grad():
            errors.append(real_error(model(x, src_key_padding_mask=pad), gm(x, src_key_padding_mask=pad), pad,
                                     batch_first))
        assert errors[-1] < TOL
        assert identical(fxbt.unroll(gm)(x, src_key_padding_mask=pad), original(model, x, src_key_padding_mask=pad))
    report = fxbt.report(gm)
    stack = report.rewritten("padding_free") + report.rewritten("fused_encoder")
    assert stack and all(r.calls.get("fast") for r in stack), [dict(r.calls) for r in stack]  # not the original
    layout = f"{'batch_first' if batch_first else 'sequence first'}, {'pre' if norm_first else 'post'}-norm"
    fused = ", encoder_impl='fused'" if impl == "fused" else ""
    style_row(record_model_row, f"nn.TransformerEncoder ({layout}, key padding mask{fused})", gm, errors)


def test_a_single_encoder_layer_without_mask_is_fused():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, FF, activation="gelu", batch_first=True).eval()
    gm = fxbt.optimize(layer, (tokens(2, 5),), inplace=False, encoder_impl="fused")
    assert len(rows(gm, "fused_encoder")) == 1, str(fxbt.report(gm))
    x = tokens(3, 6, seed=1)
    with torch.no_grad():
        assert real_error(layer(x), gm(x)) < TOL


def test_a_causal_mask_keeps_blocks_unfused_and_attention_sdpa():
    """Near-miss twin: the same encoder with a causal mask is not an encoder block (it attends to earlier
    tokens only); its attention still becomes SDPA."""
    model = encoder(batch_first=True, norm_first=False)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    gm = fxbt.optimize(model, {"src": tokens(2, 5), "mask": causal, "is_causal": True}, inplace=False,
                       encoder_impl="fused")
    assert not rows(gm, "fused_encoder")
    declined = rows(gm, "fused_encoder", "rejected")
    assert len(declined) == 2 and all("causal" in r.reason for r in declined), str(fxbt.report(gm))
    assert len(rows(gm, "sdpa")) == 2
    x = tokens(3, 5, seed=3)
    with torch.no_grad():
        assert real_error(model(x, mask=causal, is_causal=True), gm(x, mask=causal, is_causal=True)) < TOL


# --- nn.MultiheadAttention ---------------------------------------------------------------------------


class SelfAttention(nn.Module):
    def __init__(self, batch_first, kdim=None, need_weights=False, return_weights=False):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.memory = nn.Linear(E, kdim) if kdim else None
        self.need_weights, self.return_weights = need_weights, return_weights

    def forward(self, x, key_padding_mask=None, attn_mask=None):
        kv = self.memory(x) if self.memory is not None else x
        out, weights = self.attn(x, kv, kv, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                 need_weights=self.need_weights)
        return (out, weights) if self.return_weights else out


MHA_CASES = {
    "key_padding_mask": (dict(), lambda b, s: {"key_padding_mask": padding(b, s, seed=s)}),
    "float_key_padding_mask": (dict(), lambda b, s: {"key_padding_mask": padding(b, s, seed=s).float() * -1e9}),
    "bool_attn_mask": (dict(), lambda b, s: {"attn_mask": torch.ones(s, s, dtype=torch.bool).triu(1)}),
    "need_weights_unused": (dict(need_weights=True), lambda b, s: {"key_padding_mask": padding(b, s, seed=s)}),
    "separate_kv_projections": (dict(kdim=8), lambda b, s: {"key_padding_mask": padding(b, s, seed=s)}),
}


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("case", sorted(MHA_CASES))
def test_multihead_attention_becomes_sdpa(case, batch_first, record_model_row):
    torch.manual_seed(0)
    options, masks = MHA_CASES[case]
    model = SelfAttention(batch_first, **options).eval()
    gm = fxbt.optimize(model, {"x": tokens(2, 5, batch_first), **masks(2, 5)}, inplace=False)
    assert len(rows(gm, "sdpa")) == 1, str(fxbt.report(gm))
    # a mask given at the call, read by SDPA: the projections and the attention run on real tokens where it
    # masks keys (near miss: weights asked for, computed by bmm over [batch·heads] rows)
    assert len(rows(gm, "padding_free")) == (case != "need_weights_unused"), str(fxbt.report(gm))
    errors = []
    for batch, seq in [(3, 6), (1, 3)]:
        x, extra = tokens(batch, seq, batch_first, seed=seq), masks(batch, seq)
        pad = extra.get("key_padding_mask")  # its padded positions: zeros where the attention runs padding-free
        pad = None if pad is None else pad if pad.dtype == torch.bool else pad < 0
        with torch.no_grad():
            errors.append(real_error(model(x, **extra), gm(x, **extra), pad, batch_first))
        assert errors[-1] < TOL
        assert identical(fxbt.unroll(gm)(x, **extra), original(model, x, **extra))
    layout = "batch_first" if batch_first else "sequence first"
    style_row(record_model_row, f"nn.MultiheadAttention ({case.replace('_', ' ')}, {layout})", gm, errors)


def test_multihead_attention_whose_weights_are_used_is_kept_with_the_reason():
    """Near-miss twin: the caller uses the attention weights, which SDPA does not compute."""
    model = SelfAttention(True, need_weights=True, return_weights=True).eval()
    x, pad = tokens(2, 5), padding(2, 5)
    gm = fxbt.optimize(model, (x, pad), inplace=False)
    report = fxbt.report(gm)
    assert not report.rewritten(), str(report)
    assert any("attention weights" in r.reason for r in report.rejected()), str(report)
    with torch.no_grad():
        assert identical(gm(x, pad), original(model, x, pad))


# --- nn.Transformer --------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_transformer_encoder_decoder_with_causal_target_mask(batch_first, record_model_row):
    torch.manual_seed(0)
    model = nn.Transformer(E, H, 1, 1, FF, batch_first=batch_first).eval()
    src, tgt = tokens(2, 6, batch_first), tokens(2, 4, batch_first, seed=1)
    mask = nn.Transformer.generate_square_subsequent_mask(4)
    pad = padding(2, 6)
    example = {"src": src, "tgt": tgt, "tgt_mask": mask, "tgt_is_causal": True, "src_key_padding_mask": pad,
               "memory_key_padding_mask": pad}
    gm = fxbt.optimize(model, example, inplace=False)
    report = fxbt.report(gm)
    assert len(report.rewritten("sdpa")) == 3, str(report)  # encoder self, decoder self (causal), cross
    errors = []
    for batch, (s, t) in [(3, (7, 5)), (1, (3, 2))]:
        src, tgt = tokens(batch, s, batch_first, seed=s), tokens(batch, t, batch_first, seed=t)
        call = {"tgt_mask": nn.Transformer.generate_square_subsequent_mask(t), "tgt_is_causal": True,
                "src_key_padding_mask": padding(batch, s, seed=s), "memory_key_padding_mask": padding(batch, s, seed=s)}
        with torch.no_grad():
            errors.append(real_error(model(src, tgt, **call), gm(src, tgt, **call)))
        assert errors[-1] < TOL
        assert identical(fxbt.unroll(gm)(src, tgt, **call), original(model, src, tgt, **call))
    layout = "batch_first" if batch_first else "sequence first"
    style_row(record_model_row, f"nn.Transformer ({layout}, causal target mask, padding masks)", gm, errors)


# --- other libraries' styles, in plain PyTorch -----------------------------------------------------


class TorchvisionEncoderBlock(nn.Module):
    """torchvision.models.vision_transformer.EncoderBlock: pre-norm, nn.MultiheadAttention (batch_first),
    need_weights=False, an MLP of Linear, GELU, Dropout."""

    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(E, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(E, H, dropout=0.0, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(E, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(E, FF), nn.GELU(), nn.Dropout(0.0), nn.Linear(FF, E), nn.Dropout(0.0))

    def forward(self, x):
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = self.dropout(y) + x
        return x + self.mlp(self.ln_2(x))


class TorchvisionViT(nn.Module):
    def __init__(self, patch=4, image=8):
        super().__init__()
        self.conv_proj = nn.Conv2d(3, E, patch, patch)
        self.class_token = nn.Parameter(torch.randn(1, 1, E))
        self.pos_embedding = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, E) * 0.02)
        self.layers = nn.Sequential(TorchvisionEncoderBlock(), TorchvisionEncoderBlock())
        self.ln = nn.LayerNorm(E, eps=1e-6)
        self.head = nn.Linear(E, 10)

    def forward(self, images):
        x = self.conv_proj(images).flatten(2).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        return self.head(self.ln(self.layers(x))[:, 0])


class TimmAttention(nn.Module):
    """timm.models.vision_transformer.Attention: one qkv projection, reshape/permute/unbind, explicit
    softmax attention (``fused_attn`` off)."""

    def __init__(self):
        super().__init__()
        self.num_heads, self.scale = H, (E // H) ** -0.5
        self.qkv, self.proj = nn.Linear(E, 3 * E), nn.Linear(E, E)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class TimmBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(E), TimmAttention(), nn.Identity()
        self.norm2 = nn.LayerNorm(E)
        self.mlp = nn.Sequential(nn.Linear(E, FF), nn.GELU(), nn.Linear(FF, E))

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.mlp(self.norm2(x))


class TimmViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, E, 4, 4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, E))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, E) * 0.02)
        self.blocks = nn.Sequential(TimmBlock(), TimmBlock())
        self.norm = nn.LayerNorm(E)

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        return self.norm(self.blocks(x))[:, 0]


@pytest.mark.parametrize("vit", [TorchvisionViT, TimmViT], ids=["torchvision", "timm"])
def test_vision_transformer_blocks_are_fused_on_request(vit, record_model_row):
    torch.manual_seed(0)
    model = vit().eval()
    gm = fxbt.optimize(model, (torch.randn(2, 3, 8, 8),), inplace=False, encoder_impl="fused")
    report = fxbt.report(gm)
    assert len(report.rewritten("fused_encoder")) == 2 and len(report.rewritten("sdpa")) == 2, str(report)
    images = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        error = real_error(model(images), gm(images))
    assert error < TOL
    assert identical(fxbt.unroll(gm)(images), original(model, images))
    style_row(record_model_row, f"{'torchvision' if vit is TorchvisionViT else 'timm'}-style ViT (encoder_impl='fused')", gm, [error])


class OpenClipResidualAttentionBlock(nn.Module):
    """open_clip.transformer.ResidualAttentionBlock: ln_1, nn.MultiheadAttention (batch_first), LayerScale
    as identity, an MLP c_fc / GELU / c_proj; the text tower passes a causal float mask."""

    def __init__(self):
        super().__init__()
        self.ln_1, self.attn, self.ls_1 = nn.LayerNorm(E), nn.MultiheadAttention(E, H, batch_first=True), nn.Identity()
        self.ln_2 = nn.LayerNorm(E)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(E, FF))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(FF, E))
        self.ls_2 = nn.Identity()

    def forward(self, x, attn_mask=None):
        q_x = self.ln_1(x)
        x = x + self.ls_1(self.attn(q_x, q_x, q_x, need_weights=False, attn_mask=attn_mask)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class OpenClipTextTower(nn.Module):
    def __init__(self, context=6, vocab=50):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, E)
        self.positional_embedding = nn.Parameter(torch.randn(context, E) * 0.01)
        self.resblocks = nn.ModuleList([OpenClipResidualAttentionBlock(), OpenClipResidualAttentionBlock()])
        self.ln_final = nn.LayerNorm(E)
        self.register_buffer("attn_mask", torch.full((context, context), float("-inf")).triu_(1), persistent=False)

    def forward(self, text):
        x = self.token_embedding(text) + self.positional_embedding[: text.shape[1]]
        for block in self.resblocks:
            x = block(x, attn_mask=self.attn_mask[: text.shape[1], : text.shape[1]])
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)]  # the end-of-text token's features


def test_open_clip_text_tower_attention_is_sdpa(record_model_row):
    torch.manual_seed(0)
    model = OpenClipTextTower().eval()
    gm = fxbt.optimize(model, (torch.randint(0, 50, (2, 6)),), inplace=False, encoder_impl="fused")
    report = fxbt.report(gm)
    assert len(report.rewritten("sdpa")) == 2, str(report)
    assert not report.rewritten("fused_encoder") and len(report.rejected("fused_encoder")) == 2, str(report)
    text = torch.randint(0, 50, (3, 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        error = real_error(model(text), gm(text))
    assert error < TOL
    assert identical(fxbt.unroll(gm)(text), original(model, text))
    style_row(record_model_row, "open_clip-style text tower (causal float mask, encoder_impl='fused')", gm, [error])


class XTransformersAttention(nn.Module):
    """x-transformers-like: separate q / kv projections, einsum scores, a padding mask filled with
    -finfo.max, pre-norm residual block with a GELU feed-forward."""

    SCORES, OUTPUT = "b h i d, b h j d -> b h i j", "b h i j, b h j d -> b h i d"

    def __init__(self):
        super().__init__()
        self.norm, self.to_q, self.to_kv, self.to_out = nn.LayerNorm(E), nn.Linear(E, E, bias=False), \
            nn.Linear(E, 2 * E, bias=False), nn.Linear(E, E)
        self.ff = nn.Sequential(nn.LayerNorm(E), nn.Linear(E, FF), nn.GELU(), nn.Linear(FF, E))

    def forward(self, x, mask):
        b, n, _ = x.shape
        y = self.norm(x)
        q = self.to_q(y).view(b, n, H, E // H).transpose(1, 2)
        k, v = (t.view(b, n, H, E // H).transpose(1, 2) for t in self.to_kv(y).chunk(2, dim=-1))
        dots = torch.einsum(self.SCORES, q, k) * (E // H) ** -0.5
        dots = dots.masked_fill(~mask[:, None, None, :], -torch.finfo(dots.dtype).max)
        out = torch.einsum(self.OUTPUT, dots.softmax(dim=-1), v)
        x = x + self.to_out(out.transpose(1, 2).reshape(b, n, E))
        return x + self.ff(x)


def _matches_at_other_sizes(model, gm) -> list:
    """Real tokens equal at other batch and sequence sizes (padded), and unroll gives the original back."""
    errors = []
    for batch, seq in [(3, 7), (1, 2)]:
        x, keep = tokens(batch, seq, seed=seq), ~padding(batch, seq, seed=seq)
        with torch.no_grad():
            errors.append(real_error(model(x, keep), gm(x, keep), ~keep))
        assert errors[-1] < TOL
        assert identical(fxbt.unroll(gm)(x, keep), original(model, x, keep))
    return errors


class EllipsisEinsumAttention(XTransformersAttention):
    """The same block with its batch and head axes written as an ellipsis in the einsums."""

    SCORES, OUTPUT = "... i d, ... j d -> ... i j", "... i j, ... j d -> ... i d"


@pytest.mark.parametrize("block, style", [(XTransformersAttention, "einsum"), (EllipsisEinsumAttention, "ellipsis einsum")],
                         ids=["named_axes", "ellipsis"])
def test_x_transformers_like_block_attention_is_sdpa(block, style, record_model_row):
    torch.manual_seed(0)
    model = block().eval()
    gm = fxbt.optimize(model, (tokens(2, 5), ~padding(2, 5)), inplace=False)
    assert len(rows(gm, "sdpa")) == 1 and len(rows(gm, "padding_free")) == 1, str(fxbt.report(gm))
    style_row(record_model_row, f"x-transformers-like block ({style}, padding mask)", gm, _matches_at_other_sizes(model, gm))


# --- multi-query and grouped-query attention, every way of sharing K/V heads ----------------------


class SharedKV(nn.Module):
    """Q with 4 heads, K and V with ``kv`` heads shared by the query heads, written one of several ways."""

    def __init__(self, form, kv):
        super().__init__()
        self.form, self.kv, self.heads, self.d = form, kv, 4, E // 4
        self.q, self.k, self.v, self.o = nn.Linear(E, E), nn.Linear(E, kv * self.d), nn.Linear(E, kv * self.d), \
            nn.Linear(E, E)

    def forward(self, x, keep):
        b, n, _ = x.shape
        h, r, d = self.heads, self.heads // self.kv, self.d
        q = self.q(x).view(b, n, h, d).transpose(1, 2)
        k, v = (p(x).view(b, n, self.kv, d).transpose(1, 2) for p in (self.k, self.v))
        if self.form == "expand":  # repeat_kv of Llama: a new axis expanded, then merged into the heads
            k, v = (t[:, :, None].expand(b, self.kv, r, n, d).reshape(b, h, n, d) for t in (k, v))
        elif self.form == "repeat_interleave":
            k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
        elif self.form == "tiled":  # head i uses K/V head i % kv: not the grouping SDPA's enable_gqa makes
            k, v = k.repeat(1, r, 1, 1), v.repeat(1, r, 1, 1)
        # "broadcast": one K/V head broadcast by the products themselves
        scores = q @ k.transpose(-2, -1) / math.sqrt(d) + (1.0 - keep[:, None, None, :].float()) * -1e9
        return self.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, E))


@pytest.mark.parametrize("form, kv, gqa", [("broadcast", 1, True), ("expand", 2, True), ("repeat_interleave", 2, True),
                                           ("expand", 1, True), ("tiled", 2, False)])
def test_shared_key_value_heads_become_sdpa(form, kv, gqa, record_model_row):
    """Every spelling of multi-query / grouped-query attention becomes SDPA; K/V heads go in unrepeated with
    enable_gqa where the sharing is SDPA's grouping, and the tiled near-miss (head i uses K/V head i % kv)
    keeps its repeated heads."""
    torch.manual_seed(0)
    model = SharedKV(form, kv).eval()
    gm = fxbt.optimize(model, (tokens(2, 5), ~padding(2, 5)), inplace=False)
    assert len(rows(gm, "sdpa")) == 1, str(fxbt.report(gm))
    region = next(r for _, r in regions(gm) if r.kernel == "sdpa")
    assert region.params["gqa"] is gqa
    style_row(record_model_row, f"{'multi' if kv == 1 else 'grouped'}-query attention ({form.replace('_', ' ')})", gm,
              _matches_at_other_sizes(model, gm))


# --- capture that says what blocks it --------------------------------------------------------------


class BranchesOnValues(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(E, E)

    def forward(self, x):
        if (x > 0).any():  # a branch on tensor values: no frontend can capture it as one graph
            x = x * 2
        return self.proj(x)


def test_capture_error_names_the_line_that_blocks_capture():
    with pytest.raises(fxbt.CaptureError) as caught:
        fxbt.optimize(BranchesOnValues().eval(), (tokens(2, 5),), inplace=False, frontend="dynamo")
    assert caught.value.blocker.startswith("test_pytorch_modules.py:")
    assert "if (x > 0).any():" in caught.value.blocker and caught.value.blocker in str(caught.value)
