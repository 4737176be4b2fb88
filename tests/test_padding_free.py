"""Padding removal for any transformer stack: the region around an attention that runs on real tokens only."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fxbt
import handwritten
import zoo
from conftest import max_error, reference
from fxbt.pattern import Rule
from fxbt.optimized import detached
from fxbt.api import graph_module
from fxbt.region import regions
from patterns.padding_free import _take_factors
from test_encoder import real_token_error

TOL = 1e-5

# (model, attention implementation, left padding): encoders, decoders, both padding sides, both attention forms
# The pass alone (what the default runs too: the encoder-block template runs only with encoder_impl="fused")
PASS = ["softmax_attention", "existing_sdpa", "padding_free"]
STACKS = [("bert", "eager", False), ("bert", "sdpa", True), ("distilbert", "eager", True), ("albert", "eager", False),
          ("llama", "sdpa", True), ("llama", "eager", False), ("mistral", "eager", True), ("clip-text", "eager", False),
          ("gpt2", "sdpa", True), ("opt", "eager", False), ("xlm", "eager", False), ("bloom", "eager", True)]


def _padding_free(opt):
    return [r for _, r in regions(opt) if r.kernel == "padding_free"]


@pytest.mark.parametrize("name,attn,left", STACKS)
def test_whole_stack_runs_on_real_tokens(name, attn, left):
    spec = zoo.SPECS[name]
    model = spec.build(attn)
    opt = fxbt.optimize(model, zoo.make_inputs(spec, 3, 9, True, seed=1, left=left), inplace=False, patterns=PASS)
    rows = fxbt.report(opt).rewritten("padding_free")
    assert len(rows) == 1 and f"{zoo.L} attentions" in rows[0].reason, str(fxbt.report(opt))
    for batch, seq in [(4, 12)]:
        probe = zoo.make_inputs(spec, batch, seq, True, seed=batch, left=left)
        with torch.no_grad():  # BLOOM's GELU has its own backward: calls recording gradients run the model
            err = real_token_error(spec, reference(model, probe), opt(**probe), probe)
        assert err < TOL, f"{name}: {err:.2e}"
        assert [r.last_path for r in _padding_free(opt)] == ["replacement"]
    with torch.no_grad():
        assert torch.equal(fxbt.unroll(opt)(**probe)[0], reference(model, probe)[0])


def _masked_error(model, opt, x, mask) -> float:
    with torch.no_grad():
        return ((model(x, mask) - opt(x, mask)).abs() * mask[..., None]).max().item()


@pytest.mark.parametrize("style", handwritten.MASKED_STYLES, ids=lambda s: s.__name__)
def test_every_masked_handwritten_style_runs_on_real_tokens(style):
    """Whatever the layout of its heads ([b·h, s, d] for bmm, keys stored transposed, heads third)."""
    torch.manual_seed(0)
    model = handwritten.Residual(style).eval()
    opt = fxbt.optimize(model, handwritten.inputs(3, 9), inplace=False, patterns=PASS)
    rows = fxbt.report(opt).rewritten("padding_free")
    assert len(rows) == 1 and "2 attentions" in rows[0].reason, str(fxbt.report(opt))
    for batch, seq, seed in [(4, 11, 3), (2, 6, 4)]:
        x, mask = handwritten.inputs(batch, seq, seed=seed)
        for probe in (mask, mask.flip(1)):  # right and left padding
            assert _masked_error(model, opt, x, probe) < TOL
            assert [r.last_path for r in _padding_free(opt)] == ["replacement"]
    with torch.no_grad():
        assert torch.equal(fxbt.unroll(opt)(x, mask), model(x, mask))


def test_heads_merged_heads_outer_are_not_packed():
    """[h·b, s, d] has the size of [b·h, s, d]; only the views that made it say which one it is."""
    torch.manual_seed(0)
    model = handwritten.Residual(handwritten.BmmHeadsOuter).eval()
    opt = fxbt.optimize(model, handwritten.inputs(3, 9), inplace=False, patterns=PASS)
    report = fxbt.report(opt)
    assert len(report.rewritten("sdpa")) == 2 and not report.rewritten("padding_free"), str(report)
    assert any("queries do not run on packed tokens" in r.reason for r in report.rejected("padding_free")), str(report)
    x, mask = handwritten.inputs(4, 11, seed=3)
    assert _masked_error(model, opt, x, mask) < TOL


def test_inputs_in_a_tokenizers_order_run_padding_free():
    """input_ids, token_type_ids, attention_mask, as a tokenizer returns them (sentence-transformers' calls): dynamo
    proves the position table's slice ``Min(512, s)`` equal to the sequence on a size symbol it then replaces
    by another; the equality holds in the symbols the shapes are written in, so position embeddings are
    per-position and the stack runs on real tokens."""
    spec = zoo.SPECS["bert"]
    model = spec.build("sdpa")
    ids = zoo.make_inputs(spec, 4, 10, True, seed=3)
    example = {"input_ids": ids["input_ids"], "token_type_ids": torch.zeros_like(ids["input_ids"]),
               "attention_mask": ids["attention_mask"]}
    opt = fxbt.optimize(model, example, inplace=False)
    rows = fxbt.report(opt).rewritten("padding_free")
    assert len(rows) == 1 and f"{zoo.L} attentions" in rows[0].reason, str(fxbt.report(opt))
    probe = zoo.make_inputs(spec, 3, 7, True, seed=4)
    probe = {"input_ids": probe["input_ids"], "token_type_ids": torch.ones_like(probe["input_ids"]),
             "attention_mask": probe["attention_mask"]}
    with torch.no_grad():
        assert real_token_error(spec, reference(model, probe), opt(**probe), probe) < TOL
    assert [r.last_path for r in _padding_free(opt)] == ["replacement"]


def test_a_call_without_padding_runs_the_original():
    spec = zoo.SPECS["albert"]
    model = spec.build()
    opt = fxbt.optimize(model, spec.example(), inplace=False, patterns=PASS)
    probe = zoo.make_inputs(spec, 2, 7, pad=False)
    with torch.no_grad():
        assert max_error(reference(model, probe), opt(**probe)) < TOL
    (region,) = _padding_free(opt)
    assert region.last_path == "no token is padding in this call"


@pytest.mark.parametrize("name,attn", [("bert", "sdpa"), ("llama", "sdpa"), ("t5", "eager")])
def test_an_example_without_padding_still_makes_the_stack_padding_free(name, attn):
    """The example users have at hand: one sentence, nothing padded. Verification runs the packed path on every
    token; padded batches later are served by it."""
    spec = zoo.SPECS[name]
    model = spec.build(attn)
    # dynamo: from transformers 4's tracer, the graph for a batch of one pins the batch and T5's stack in it stays
    # padded (the first padded call then gets a graph of its own, padding-free); dynamo keeps the batch symbolic
    opt = fxbt.optimize(model, zoo.make_inputs(spec, 1, 7, pad=False), inplace=False, patterns=PASS,
                        frontend="dynamo")
    assert fxbt.report(opt).rewritten("padding_free"), str(fxbt.report(opt))
    probe = zoo.make_inputs(spec, 4, 12, True, seed=2, left=name == "llama")
    assert real_token_error(spec, reference(model, probe), opt(**probe), probe) < TOL
    assert _padding_free(opt)[0].last_path == "replacement"  # the (first) encoder stack


def test_a_mask_computed_from_sizes_alone_is_declined():
    """Near-miss twin: called without an attention mask, a decoder's mask is causal and nothing else, so no token
    is ever padding: no region is installed to fall back on every call."""
    spec = zoo.SPECS["llama"]
    example = zoo.make_inputs(spec, 2, 7, pad=False)
    del example["attention_mask"]
    opt = fxbt.optimize(spec.build("sdpa"), example, inplace=False, patterns=PASS)
    rows = fxbt.report(opt).rejected("padding_free")
    assert not fxbt.report(opt).rewritten("padding_free")
    assert rows and all("sizes alone" in r.reason for r in rows), str(fxbt.report(opt))


def test_attention_without_a_mask_is_declined_with_the_reason():
    spec = zoo.SPECS["vit"]
    opt = fxbt.optimize(spec.build(), spec.example(), inplace=False, patterns=PASS)
    rows = fxbt.report(opt).rejected("padding_free")
    assert rows and all("no token is ever padding" in r.reason for r in rows), \
        str(fxbt.report(opt))


def test_a_convolution_over_the_sequence_keeps_the_stack_padded():
    """Near-miss twin: the same stack, but its output is mixed over positions: padded values are read."""
    model = handwritten.ConvPooledStack().eval()
    opt = fxbt.optimize(model, handwritten.inputs(3, 9), inplace=False, patterns=PASS)
    report = fxbt.report(opt)
    assert not report.rewritten("padding_free")
    assert any("mixes positions" in r.reason for r in report.rejected("padding_free")), str(report)
    x, mask = handwritten.inputs(4, 11, seed=3)
    with torch.no_grad():
        assert max_error(model(x, mask), opt(x, mask)) < TOL  # every position, padded ones too


@pytest.mark.parametrize("mode", ["mean", "mean_expanded", "max", "unmasked"])
def test_a_stack_pooled_over_its_real_tokens_runs_on_them(mode):
    """Multiplied by the mask (or filled under it) before pooling, padded positions are never read: the stack runs
    padding-free, and checks per call that the pooling mask blanks every padded position. The unmasked mean, the
    near-miss twin, reads them: its stack stays padded."""
    model = handwritten.MaskPooledStack(mode).eval()
    x, mask = handwritten.inputs(3, 9)
    opt = fxbt.optimize(model, (x, mask, mask.clone()), inplace=False, patterns=PASS)
    report = fxbt.report(opt)
    x, mask = handwritten.inputs(4, 11, seed=3)
    with torch.no_grad():
        assert max_error(model(x, mask, mask), opt(x, mask, mask)) < TOL  # pooled: every position counts
    if mode == "unmasked":
        assert not report.rewritten("padding_free")
        assert any("mixes positions" in r.reason for r in report.rejected("padding_free")), str(report)
        return
    assert len(report.rewritten("padding_free")) == 1, str(report)
    assert [r.last_path for r in _padding_free(opt)] == ["replacement"]
    pool_all = torch.ones_like(mask)  # pooling over padded positions too: the original's values are needed there
    with torch.no_grad():
        assert max_error(model(x, mask, pool_all), opt(x, mask, pool_all)) < TOL
    assert "does not blank every padded position" in _padding_free(opt)[0].last_path
    with torch.no_grad():
        assert torch.equal(fxbt.unroll(opt)(x, mask, mask), model(x, mask, mask))


def test_a_pooling_factor_gone_from_the_graph_keeps_the_stack_padded():
    """The factor a region checks per call is named when the region is made; should a later rewrite take that node
    in, the check is impossible, and the region must give the original's padded positions, not skip the check."""
    model = handwritten.MaskPooledStack("mean").eval()
    x, mask = handwritten.inputs(3, 9)
    opt = fxbt.optimize(model, (x, mask, mask.clone()), inplace=False, patterns=PASS)
    gm = graph_module(opt)
    (node,) = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in dict(regions(gm))
               and gm.get_submodule(n.target).kernel == "padding_free"]
    region = gm.get_submodule(node.target)
    ((axes, kind),) = region.params["blanking"]
    del region.slots["factors"]
    region.params["blanking"] = (("a_node_no_longer_there", axes, kind),)
    _take_factors(gm, node, region)
    assert region.params["factors_lost"] == ("a_node_no_longer_there",)
    x, mask = handwritten.inputs(4, 11, seed=3)
    pool_all = torch.ones_like(mask)
    with torch.no_grad():
        assert max_error(model(x, mask, pool_all), opt(x, mask, pool_all)) < TOL
    assert "gone from the graph" in region.last_path


@pytest.mark.parametrize("model", [handwritten.PoolerStack(), handwritten.BiasedStack("per_head"),
                                   handwritten.BiasedStack("local")], ids=["pooler", "per_head_bias", "local"])
def test_hand_written_stacks_with_pooler_and_biases(model):
    """A pooler reading position 0 (padding on the left), a bias per head, a mask that differs per query."""
    model.eval()
    x, mask = handwritten.inputs(3, 9)
    opt = fxbt.optimize(model, (x, mask), inplace=False, patterns=PASS)
    assert fxbt.report(opt).rewritten("padding_free"), str(fxbt.report(opt))
    x, mask = handwritten.inputs(4, 10, seed=5)
    mask[2, :4] = 0  # left padding: position 0 is read by the pooler
    with torch.no_grad():
        want, got = model(x, mask), opt(x, mask)
    for w, g in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
        diff = (w - g).abs()
        if diff.dim() == 3:
            diff = diff * mask[..., None]
        assert diff.max().item() < TOL
    assert [r.last_path for r in _padding_free(opt)] == ["replacement"]


@pytest.mark.parametrize("order", ["batch_outer", "sequence_outer"])
def test_linears_over_merged_batch_and_sequence_axes(order):
    """[batch·sequence, features] rows, batch outer (GPT-2, OPT), are packed tokens too; the near-miss twin merges
    them sequence outer, which reads the stack's output across positions as far as fxbt can tell: kept padded."""
    model = handwritten.Stack(lambda: handwritten.MergedTokensBlock(order), layers=2).eval()
    opt = fxbt.optimize(model, handwritten.inputs(3, 9), inplace=False, patterns=PASS)
    report = fxbt.report(opt)
    if order == "batch_outer":
        (row,) = report.rewritten("padding_free")
        assert "2 attentions" in row.reason, str(report)
        inside = {n.meta.get("fxbt_packed_from") for n in _padding_free(opt)[0].packed.graph.nodes}
        assert {"addmm", "addmm_1"} <= inside, str(report)
    else:
        assert not report.rewritten("padding_free")
        assert all("mixes positions" in r.reason for r in report.rejected("padding_free")), str(report)
    x, mask = handwritten.inputs(4, 11, seed=3)
    mask[2, :5] = 0
    with torch.no_grad():
        assert ((model(x, mask) - opt(x, mask)).abs() * mask[..., None]).max().item() < TOL
    assert [r.last_path for r in _padding_free(opt)] == (["replacement"] if order == "batch_outer" else [])


@pytest.mark.parametrize("patterns, impl", [(PASS, "auto"), (None, "fused")], ids=["padding_free", "encoder_template"])
def test_cross_attention_over_a_padding_free_stack_checks_its_mask_per_call(patterns, impl):
    """The encoder leaves zeros at padded positions; the decoder's cross-attention reads them as keys. Exact when
    its own mask masks them (checked per call); near-miss twins: a mask that lets the padded keys be read, and an
    empty encoder row (its queries weigh every key alike), which run the original: the whole call, or (the pass,
    which leaves no zeros in a call with a sequence of no real token) the stack's own subgraph."""
    model = handwritten.CrossAttending().eval()
    x, mask = handwritten.inputs(3, 9)
    y = torch.randn(3, 5, handwritten.DIM)
    opt = fxbt.optimize(model, (x, mask, y, mask.clone()), inplace=False, patterns=patterns, encoder_impl=impl)
    report = fxbt.report(opt)
    assert report.rewritten("padding_free" if patterns else "fused_encoder"), str(report)
    x, mask = handwritten.inputs(4, 11, seed=3)
    mask[3, 7:] = 0
    y = torch.randn(4, 6, handwritten.DIM)
    empty = mask.clone()
    empty[1] = 0
    for cross, keys, fast in [(mask.clone(), mask, True), (torch.ones_like(mask), mask, False),
                              (empty.clone(), empty, bool(patterns))]:
        before = fxbt.report(opt).original_calls.total()
        with torch.no_grad():
            want, got = model(x, keys, y, cross), opt(x, keys, y, cross)
        assert ((want[0] - got[0]).abs() * keys[..., None]).max().item() < TOL
        assert (want[1] - got[1]).abs().max().item() < TOL  # every decoder position
        assert (fxbt.report(opt).original_calls.total() == before) is fast, fxbt.report(opt).original_calls
    if patterns:
        assert [r.last_path for r in _padding_free(opt)] == ["a sequence has no real token"]


@pytest.mark.parametrize("keys", ["memory", "running_mean"])
def test_a_decoder_stack_runs_on_real_tokens_with_its_cross_attentions(keys):
    """Each cross-attention runs inside the decoder's packed stack on its queries padded again, its keys (the
    encoder's output, zeros at padded positions) and mask as they are. Near-miss twin: keys from a running mean of
    the decoder's own states read padded positions: the decoder stays padded (the encoder's stack does not)."""
    torch.manual_seed(0)
    model = handwritten.EncoderDecoder(keys).eval()
    x, mask = handwritten.inputs(3, 9)
    y, y_mask = handwritten.inputs(3, 6, seed=1)
    opt = fxbt.optimize(model, (x, mask, y, y_mask), inplace=False, patterns=PASS)
    stacks = [r.reason.split(", ", 1)[1] for r in fxbt.report(opt).rewritten("padding_free")]
    decoder = ["4 attentions on real tokens"] if keys == "memory" else []  # the twin's decoder stays padded
    assert stacks == ["2 attentions on real tokens", *decoder], str(fxbt.report(opt))
    for batch, seq, steps, seed in [(4, 11, 7, 3), (2, 5, 9, 4)]:
        x, mask = handwritten.inputs(batch, seq, seed=seed)
        y, y_mask = handwritten.inputs(batch, steps, seed=seed + 1)
        y_mask[0, -2:] = 0
        with torch.no_grad():
            want, got = model(x, mask, y, y_mask), opt(x, mask, y, y_mask)
        assert ((want[0] - got[0]).abs() * mask[..., None]).max().item() < TOL
        assert ((want[1] - got[1]).abs() * y_mask[..., None]).max().item() < TOL
        assert [r.last_path for r in _padding_free(opt)] == ["replacement"] * len(stacks)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(fxbt.unroll(opt)(x, mask, y, y_mask), model(x, mask, y, y_mask)))
    weights = torch.randn(y.shape) * y_mask[..., None]  # a loss over the decoder's real tokens

    def gradients(run):
        model.zero_grad(set_to_none=True)
        (run(x, mask, y, y_mask)[1] * weights).sum().backward()
        return [p.grad for p in model.parameters()]

    with detached(model):
        want = gradients(model)
    got = gradients(opt)
    assert [a is None for a in got] == [b is None for b in want]  # the twin's cross projections go unused
    assert max((a - b).abs().max().item() for a, b in zip(got, want) if b is not None) < 1e-4  # of size ~10


@pytest.mark.parametrize("name,left", [("bart", False), ("t5", False), ("t5", True)])
def test_encoder_decoder_models_run_their_decoders_on_real_tokens(name, left):
    """BART's and T5's decoder stacks, self- and cross-attentions, on the decoder's real tokens."""
    spec = zoo.SPECS[name]
    model = spec.build()

    def inputs(batch, seq, seed):
        x = zoo.make_inputs(spec, batch, seq, True, seed=seed)
        x["decoder_attention_mask"] = zoo._mask(batch, x["decoder_input_ids"].shape[1], True, left)
        return x

    opt = fxbt.optimize(model, inputs(3, 9, 1), inplace=False, patterns=PASS)
    reasons = [r.reason for r in fxbt.report(opt).rewritten("padding_free")]
    assert any(f"{2 * zoo.L} attentions on real tokens" in r for r in reasons), str(fxbt.report(opt))
    for batch, seq, seed in [(4, 12, 2), (2, 7, 3)]:
        probe = inputs(batch, seq, seed)
        with torch.no_grad():
            want, got = reference(model, probe), opt(**probe)
        real = probe["decoder_attention_mask"].bool()
        assert (want.last_hidden_state - got.last_hidden_state)[real].abs().max().item() < TOL
        assert not fxbt.report(opt).original_calls
        assert all(r.last_path == "replacement" for r in _padding_free(opt))


@pytest.mark.parametrize("kind", ["given", "argmax"])
def test_positions_picked_by_index_tensors_are_computed(kind):
    """A pooler picking a position per row (CLIP's end-of-text token): the picked positions are computed even
    where they are padding; near-miss twin: indices taken from the stack's output, which reads padded positions."""
    model = handwritten.PickedPooler(kind).eval()
    x, mask = handwritten.inputs(3, 9)
    opt = fxbt.optimize(model, (x, mask, torch.tensor([0, 3, 8])), inplace=False, patterns=PASS)
    report = fxbt.report(opt)
    assert bool(report.rewritten("padding_free")) is (kind == "given"), str(report)
    x, mask = handwritten.inputs(4, 11, seed=3)
    mask[3, :4] = 0
    pick = torch.tensor([10, 2, 0, 1])  # rows 1 and 3: padded positions
    with torch.no_grad():
        want, got = model(x, mask, pick), opt(x, mask, pick)
    assert ((want[0] - got[0]).abs() * mask[..., None]).max().item() < TOL
    assert (want[1] - got[1]).abs().max().item() < TOL
    assert [r.last_path for r in _padding_free(opt)] == (["replacement"] if kind == "given" else [])


def test_gradients_through_the_packed_stack():
    spec = zoo.SPECS["albert"]
    model = spec.build(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    opt = fxbt.optimize(model, spec.example(), inplace=False, patterns=PASS)
    assert fxbt.report(opt).rewritten("padding_free"), str(fxbt.report(opt))
    probe = spec.probe()
    assert _gradient_error(model, opt, probe) < TOL
    assert [r.last_path for r in _padding_free(opt)] == ["replacement"]


def _gradient_error(model, opt, probe) -> float:
    """Largest difference of the parameters' gradients of a linear loss over real tokens, relative to each
    gradient's scale: sums over many tokens (embedding tables reach ~100s) round in fp32."""
    mask = probe["attention_mask"]
    weight = mask[..., None] * torch.randn(*mask.shape, zoo.H, generator=torch.Generator().manual_seed(0)).to(mask.device)
    grads = []
    for m in (opt, model):
        m.zero_grad()
        (m(**probe)[0] * weight).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    return max(((grads[0][n] - grads[1][n]).abs().max() / grads[1][n].abs().max().clamp(min=1)).item()
               for n in grads[0])


@pytest.mark.parametrize("model_class,config_class,config", [
    ("T5EncoderModel", "T5Config", dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=99)),
    ("RoFormerModel", "RoFormerConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=64, vocab_size=99)),
], ids=["t5_encoder_relative_bias", "roformer_interleaved_rotary"])
def test_position_schemes_run_as_the_model_wrote_them(model_class, config_class, config):
    """A relative-position bias (T5) and interleaved rotary embeddings (RoFormer: strided slices, stack, reshape_as)."""
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**config)
    model = getattr(transformers, model_class)._from_config(config, attn_implementation="eager").eval()
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:], mask[2, 3:] = 0, 0
    opt = fxbt.optimize(model, {"input_ids": torch.randint(3, 99, (3, 9)), "attention_mask": mask}, inplace=False)
    assert fxbt.report(opt).rewritten("padding_free"), str(fxbt.report(opt))
    probe = {"input_ids": torch.randint(3, 99, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    probe["attention_mask"][1, 5:], probe["attention_mask"][3, 2:] = 0, 0
    with torch.no_grad():
        want, got = model(**probe).last_hidden_state, opt(**probe).last_hidden_state
    assert ((want - got).abs() * probe["attention_mask"][..., None]).max().item() < TOL
    assert [r.last_path for r in _padding_free(opt)] == ["replacement"]


def _gelu(x):
    return F.gelu(x)


def _gelu_off_by_one(x):
    return F.gelu(x) + 1.0


def test_a_block_rule_reverted_at_verification_leaves_its_stack_to_the_padding_free_pass():
    """A rule of the block pass that the example proves wrong is reverted; the stack it held is then made
    padding-free as if the rule had declined (before, reverting left the stack padded: MPT's blocks)."""
    wrong = Rule("gelu_off_by_one", _gelu, _gelu_off_by_one, priority=1)
    torch.manual_seed(0)
    model = handwritten.Stack(lambda: handwritten.SizeScaledBlock("head_dim"), layers=2).eval()
    opt = fxbt.optimize(model, handwritten.inputs(3, 9), inplace=False, patterns=PASS + [wrong])
    report = fxbt.report(opt)
    assert [r.status for r in report.rows if r.pattern == "gelu_off_by_one"] == ["rejected"] * 2, str(report)
    assert all("verification: outputs differ" in r.reason for r in report.rows if r.pattern == "gelu_off_by_one")
    rows = report.rewritten("padding_free")
    assert len(rows) == 1 and "2 attentions" in rows[0].reason, str(report)
    x, mask = handwritten.inputs(4, 11, seed=3)
    assert _masked_error(model, opt, x, mask) < TOL
    assert [r.last_path for r in _padding_free(opt)] == ["replacement"]


def test_whole_shape_and_dtype_reads_of_plain_fx_graphs_run_padding_free():
    """Plain fx (and transformers 4's tracer, MPT and StableLM) record ``h.shape[:2]`` as one shape read and
    ``mask.to(h.dtype)`` as a dtype read of the embedded tokens; read per size, with the dtype a constant, the stack
    is packed like dynamo's graph of the same code (before, the shape read left the region and the stack stayed
    padded)."""
    torch.manual_seed(0)
    model = handwritten.WholeShapeReads().eval()
    ids, mask = torch.randint(0, 50, (3, 9)), handwritten.inputs(3, 9)[1]
    opt = fxbt.optimize(model, (ids, mask), inplace=False, patterns=PASS, frontend="fx")
    rows = fxbt.report(opt).rewritten("padding_free")
    assert len(rows) == 1 and "2 attentions" in rows[0].reason, str(fxbt.report(opt))
    for batch, seq in [(4, 11), (2, 6)]:
        ids, mask = torch.randint(0, 50, (batch, seq)), handwritten.inputs(batch, seq, seed=batch)[1]
        for probe in (mask, mask.flip(1)):
            with torch.no_grad():
                err = ((model(ids, probe) - opt(ids, probe)).abs() * probe[..., None]).max().item()
            assert err < TOL
            assert [r.last_path for r in _padding_free(opt)] == ["replacement"]
    with torch.no_grad():
        assert torch.equal(fxbt.unroll(opt)(ids, mask), model(ids, mask))


_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=99)


@pytest.mark.parametrize("model_class,config_class,config,note", [
    ("FalconModel", "FalconConfig", dict(_SMALL, num_kv_heads=2, new_decoder_architecture=True,
                                                 use_cache=False), "2 attentions"),
    ("MptModel", "MptConfig", dict(d_model=32, n_layers=2, n_heads=4, expansion_ratio=2, max_seq_len=64,
                                   vocab_size=99), "2 attentions"),
    ("DebertaV2Model", "DebertaV2Config", dict(_SMALL, intermediate_size=64, relative_attention=True,
                                               pos_att_type=["c2p", "p2c"], position_buckets=8,
                                               max_relative_positions=16, norm_rel_ebd="layer_norm",
                                               share_att_key=True, position_biased_input=False), "2 score terms"),
], ids=["falcon_gqa_broadcast_to", "mpt_alibi", "deberta_v2_relative"])
def test_stacks_with_their_own_head_and_position_schemes_run_on_real_tokens(model_class, config_class, config, note):
    """Falcon's grouped K/V widened with ``broadcast_to(query.shape)``; MPT's ALiBi added as [heads, 1, keys] (the
    block template declines it at its check) and, on transformers 4, its graph from the HF tracer, which reads
    sizes as one tuple and the mask's dtype from the embedded tokens; DeBERTa-v2/v3's disentangled attention, its
    content-to-position and position-to-content terms computed from Q and K. Default frontend and patterns."""
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config)).eval()
    spec = zoo.SPECS["llama"]
    opt = fxbt.optimize(model, zoo.make_inputs(spec, 3, 9, True, seed=1, left=True), inplace=False)
    rows = fxbt.report(opt).rewritten("padding_free")
    assert len(rows) == 1 and note in rows[0].reason, str(fxbt.report(opt))
    for left in (True, False):
        probe = zoo.make_inputs(spec, 4, 12, True, seed=2, left=left)
        assert real_token_error(spec, reference(model, probe), opt(**probe), probe) < TOL
        assert [r.last_path for r in _padding_free(opt)] == ["replacement"]


@pytest.mark.parametrize("kind", ["c2p", "einsum"])
def test_a_score_term_computed_from_queries_runs_padded_inside_the_packed_stack(kind):
    """DeBERTa's content-to-position term and BERT's relative_key term, hand-written: gathered from Q·pos_kᵀ by
    relative position, or an einsum of Q with distance embeddings. Their nodes run on the queries padded again,
    and each attention restricts the term to the sequence's real tokens."""
    torch.manual_seed(0)
    model = handwritten.RelativeScoreStack(kind).eval()
    opt = fxbt.optimize(model, handwritten.inputs(3, 9), inplace=False, patterns=PASS)
    rows = fxbt.report(opt).rewritten("padding_free")
    assert len(rows) == 1 and "2 attentions" in rows[0].reason and "2 score terms" in rows[0].reason, \
        str(fxbt.report(opt))
    for batch, seq, seed in [(4, 11, 3), (2, 6, 4)]:
        x, mask = handwritten.inputs(batch, seq, seed=seed)
        mask[1:, seq // 3:] = 0
        for probe in (mask, mask.flip(1)):
            assert _masked_error(model, opt, x, probe) < TOL
            assert [r.last_path for r in _padding_free(opt)] == ["replacement"]
    with torch.no_grad():
        assert torch.equal(fxbt.unroll(opt)(x, mask), model(x, mask))


def test_a_score_term_that_reads_every_position_keeps_the_stack_padded():
    """Near-miss twin: Q against the keys averaged over the sequence. Padded again, the keys' padded positions would
    be zeros where the original averages real values: declined with the reason, not left to verification."""
    torch.manual_seed(0)
    model = handwritten.RelativeScoreStack("mean_keys").eval()
    opt = fxbt.optimize(model, handwritten.inputs(3, 9), inplace=False, patterns=PASS)
    report = fxbt.report(opt)
    assert not report.rewritten("padding_free"), str(report)
    assert all("score term" in r.reason and "mean" in r.reason for r in report.rejected("padding_free")), str(report)
    x, mask = handwritten.inputs(4, 11, seed=3)
    assert _masked_error(model, opt, x, mask) < TOL


def _left_among_real_tokens(mask: torch.Tensor, keep: torch.Tensor):
    """Oracle, one sequence at a time: what its mask among its real tokens can be read as, False (nothing) or
    True (exactly causal; a sequence of one token is both); the batch's verdict is one every sequence allows
    (nothing first), None where there is none."""
    common = {False, True}
    for row, real in zip(mask.expand(keep.shape[0], -1, keep.shape[1], -1), keep):
        sub = row[:, real][:, :, real]
        unmasked = sub if sub.dtype == torch.bool else sub == 0
        lower = torch.ones(sub.shape[-2:], dtype=torch.bool).tril()
        common &= {v for v, holds in ((False, unmasked.all()), (True, (unmasked == lower).all())) if holds}
    return False if False in common else True if common else None


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("kind", ["keys", "causal", "causal_short", "bias", "one_sequence_biased"])
@pytest.mark.parametrize("left", [False, True])
def test_what_a_mask_leaves_among_real_tokens_is_found_for_the_batch_at_once(kind, dtype, left):
    """The varlen path rests on this: every sequence's mask among its real tokens is nothing or causal."""
    from fxbt.packing import Tokens
    from fxbt.patterns.padding_free import _masked, _same_in_every_sequence

    batch, seq = 4, 7
    keep = zoo._mask(batch, seq, True, left=left).bool()
    allowed = keep[:, None, None, :].expand(batch, 1, seq, seq).clone()  # [b, 1, q, k]: True = may attend
    if kind.startswith("causal"):
        allowed &= torch.ones(seq, seq, dtype=torch.bool).tril()
    if kind == "causal_short":  # the queries axis broadcasts (the last query's row): nothing left
        allowed = allowed[:, :, -1:]
    bias = torch.zeros(batch, 1, allowed.shape[2], seq)
    if kind == "bias":
        bias += torch.arange(seq, dtype=torch.float32)
    if kind == "one_sequence_biased":
        bias[1] += 0.5
    if dtype == torch.bool and kind in ("bias", "one_sequence_biased"):
        allowed[1, 0, :, -1 if left else 0] = False  # a bool mask's own near miss: a real key hidden in one sequence
    mask = allowed if dtype == torch.bool else torch.where(allowed, bias, torch.finfo(torch.float32).min)
    want = _left_among_real_tokens(mask, keep)
    assert _same_in_every_sequence(mask, _masked(mask), Tokens(keep), False) == want
    assert want == {"keys": False, "causal": True, "causal_short": False}.get(kind, None)


@pytest.mark.parametrize("name,attn,left", [("bert", "sdpa", False), ("llama", "sdpa", True), ("gpt2", "eager", True)])
def test_sequences_padded_again_to_the_longest_match_one_call_per_sequence(name, attn, left, monkeypatch):
    """The one-call form CUDA uses where flash attention does not fit (fp32, dropout), run here on the CPU: same
    outputs as the model, and gradients equal to the model's with dropout off."""
    from fxbt import varlen
    from fxbt.patterns import padding_free

    calls, original = [], varlen.padded_attention
    monkeypatch.setattr(padding_free, "ONE_PADDED_CALL", {"cpu"})
    monkeypatch.setattr(varlen, "padded_attention", lambda *a: calls.append(a[4]) or original(*a))
    spec = zoo.SPECS[name]
    model = spec.build(attn)
    opt = fxbt.optimize(model, zoo.make_inputs(spec, 3, 9, True, seed=1, left=left), inplace=False, patterns=PASS)
    probe = zoo.make_inputs(spec, 4, 12, True, seed=4, left=left)
    calls.clear()
    assert real_token_error(spec, reference(model, probe), opt(**probe), probe) < TOL
    assert [r.last_path for r in _padding_free(opt)] == ["replacement"]
    assert calls == [name != "bert"] * zoo.L  # causal for the decoders
    assert _gradient_error(model, opt, probe) < TOL



def test_what_only_a_score_term_reads_is_computed_inside_the_packed_stack():
    """Each layer's projection of the position table feeds its score term alone: it is computed inside the packed
    graph where the model computes it, not before the stack as one of its inputs (DeBERTa held all 24 at once)."""
    torch.manual_seed(0)
    model = handwritten.RelativeScoreStack("c2p").eval()
    opt = fxbt.optimize(model, handwritten.inputs(3, 9), inplace=False, patterns=PASS)
    packed = next(r.packed for _, r in regions(opt) if r.kernel == "padding_free")
    linears = [n for n in packed.graph.nodes if getattr(n.target, "__name__", str(n.target)) == "linear"]
    assert len(linears) == 2 * len(model.qkv), packed.graph  # each layer's qkv and its position projection
    x, mask = handwritten.inputs(4, 11, seed=3)
    assert _masked_error(model, opt, x, mask) < TOL
