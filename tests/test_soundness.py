"""A graph is never run outside the conditions it was captured and proven under.

One test (or a few) per class of failure the soundness issue lists, each reproducing what went wrong
before guards, specializations and run-time proofs existed:

1. examples with batch 1 or sequence 1;  2. examples whose sizes coincide;  3. "causal" proven on the
example only;  4. replaced parameters;  5. modes;  6. edges (fully masked rows, empty batches);
7. padded positions read back;  8. run-time assumptions failing during verification;
9. process-wide side effects and threads.
"""
from __future__ import annotations

import threading
import types

import pytest
import torch
import torch.nn as nn
import transformers

import fxbt
import handwritten as hw
import zoo
from conftest import max_error, reference
from test_encoder import real_token_error

TOL = 1e-5


def _bert(**overrides):
    return zoo.SPECS["bert"].build(hidden_size=64, intermediate_size=128, **overrides)


def _check(spec, model, optimized, shapes, left=False):
    worst = 0.0
    for batch, seq in shapes:
        inputs = zoo.make_inputs(spec, batch, seq, pad=True, seed=batch * 100 + seq, left=left)
        with torch.inference_mode():
            worst = max(worst, real_token_error(spec, reference(model, inputs), optimized(**inputs), inputs))
    return worst


# --- 1, 2: example sizes ------------------------------------------------------------------------------


@pytest.mark.parametrize("example", [(1, 8), (2, 1), (4, 4), (1, 1)])
def test_an_example_of_batch_one_sequence_one_or_equal_sizes_serves_every_size(example):
    """Dynamo specialises size-1 dimensions and unifies equal sizes; the guards record what it did, and a
    call outside them gets a graph of its own, never one captured for other sizes."""
    spec, model = zoo.SPECS["bert"], _bert()
    optimized = fxbt.optimize(model, zoo.make_inputs(spec, *example, pad=True, seed=1), inplace=False)
    assert _check(spec, model, optimized, [(3, 10), (1, 1), (4, 4), (2, 7), (5, 1)]) < TOL
    report = fxbt.report(optimized)
    assert all(g.rewritten("sdpa") for g in report.reports)  # every graph is a fast one
    # and the stack runs on real tokens wherever a sequence can hold padding (a graph for length 1 cannot)
    assert any(g.rewritten("padding_free") for g in report.reports), str(report)
    made = [h for h in report.history if h.startswith("specialization made")]
    assert len(made) == len(report.reports) <= 4, report.history


def test_the_guard_names_the_size_a_capture_pinned():
    spec, model = zoo.SPECS["bert"], _bert()
    optimized = fxbt.optimize(model, zoo.make_inputs(spec, 2, 1, pad=False, seed=1), inplace=False)
    guard = fxbt.api.specializations(optimized)[0].shapes
    assert not guard.static and "input_ids.size(1) == 1" in [guard.describe(c) for c in guard.conditions]
    with torch.inference_mode():
        optimized(**zoo.make_inputs(spec, 3, 10, pad=True, seed=2))
    assert "input_ids.size(1) != 1" in fxbt.report(optimized).history[-1] or \
        "input_ids.size(1) == 1" in fxbt.report(optimized).history[-1]


# --- 3: facts proven for every size, not on the example --------------------------------------------------


def test_a_window_as_long_as_the_example_is_not_taken_for_causal(monkeypatch):
    torch.manual_seed(0)
    model = hw.SlidingWindow(window=4).eval()
    x, _ = hw.inputs(2, 4, pad=False)
    optimized = fxbt.optimize(model, (x,), inplace=False)
    region = next(r for _, r in fxbt.region.regions(optimized) if r.kernel == "sdpa")
    assert region.params["causal"]  # causal on the example: a candidate, decided per size at run time
    causal_calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: causal_calls.append(k.get("is_causal", False)) or real_sdpa(*a, **k))
    for seq, causal in [(12, False), (3, True), (4, True), (9, False)]:
        x, _ = hw.inputs(2, seq, pad=False, seed=seq)
        with torch.no_grad():
            assert max_error(model(x), optimized(x)) < TOL, seq
        assert causal_calls[-1] is causal, seq


def test_mistral_sliding_window_optimized_on_its_window_length():
    spec = zoo.SPECS["mistral"]
    model = spec.build(sliding_window=4)
    optimized = fxbt.optimize(model, zoo.make_inputs(spec, 1, 4, pad=False, seed=1), inplace=False)
    for batch, seq in [(1, 12), (2, 9)]:
        for with_mask in (True, False):
            inputs = zoo.make_inputs(spec, batch, seq, pad=with_mask, seed=seq)
            if not with_mask:
                inputs.pop("attention_mask")
            with torch.inference_mode():
                assert real_token_error(spec, reference(model, inputs)[0], optimized(**inputs)[0], inputs) < TOL


def test_gpt_neo_local_attention_window_is_proven_per_size():
    spec = zoo.SPECS["gpt-neo"]  # layer 0 global, layer 1 local with a window of 4, masks from a buffer
    model = spec.build()
    example = zoo.make_inputs(spec, 2, 4, pad=False, seed=1)
    example.pop("attention_mask")
    optimized = fxbt.optimize(model, example, inplace=False)
    assert all(r.params["causal"] for _, r in fxbt.region.regions(optimized) if r.kernel == "sdpa")
    probe = zoo.make_inputs(spec, 2, 12, pad=False, seed=2)
    probe.pop("attention_mask")
    with torch.inference_mode():
        assert max_error(reference(model, probe)[0], optimized(**probe)[0]) < TOL


# --- 4: parameters read at call time -------------------------------------------------------------------


def test_replaced_parameters_and_assign_loads_are_used():
    spec = zoo.SPECS["bert"]
    model = _bert()
    fxbt.optimize(model, spec.example())  # in place: the model is what the user keeps calling
    probe = spec.probe()
    query = model.encoder.layer[0].attention.self.query
    query.weight = nn.Parameter(torch.randn_like(query.weight))
    with torch.inference_mode():
        assert real_token_error(spec, reference(model, probe), model(**probe), probe) < TOL
    assert "parameter encoder.layer.0.attention.self.query.weight was replaced" in " ".join(fxbt.report(model).history)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)

    def relative_error():  # random LayerNorm weights and biases make outputs of size ~10: fp32 rounding grows
        want = reference(model, probe)
        return real_token_error(spec, want, model(**probe), probe) / max(1.0, want.last_hidden_state.abs().max())

    with torch.inference_mode():
        assert relative_error() < TOL
    with torch.no_grad():  # in-place changes need no new graph: the graph reads the same tensors
        model.encoder.layer[1].output.dense.weight.mul_(0.5)
        count = len(fxbt.report(model).reports)
        assert relative_error() < TOL
        assert len(fxbt.report(model).reports) == count


def test_one_tensor_given_for_two_inputs_does_not_bind_later_calls():
    """dynamo captures a tensor given twice as one graph input; a call with two different tensors gets its own
    graph (near-miss twin of the example: the same values, in two tensors)."""
    model = hw.CrossAttending().eval()
    x, mask = hw.inputs(3, 9)
    y = torch.randn(3, 5, hw.DIM)
    opt = fxbt.optimize(model, (x, mask, y, mask), inplace=False, frontend="dynamo")
    cross = torch.ones_like(mask)
    with torch.no_grad():
        assert max_error(model(x, mask, y, cross)[1], opt(x, mask, y, cross)[1]) < TOL
        assert max_error(model(x, mask, y, mask)[1], opt(x, mask, y, mask)[1]) < TOL
    assert "share memory differently" in " ".join(fxbt.report(opt).history), fxbt.report(opt).history
    assert len(fxbt.report(opt).reports) == 2


@pytest.mark.parametrize("patterns", [None, ["softmax_attention", "padding_free"]], ids=["template", "padding_free"])
def test_an_example_reading_padded_keys_reverts_the_stack_that_leaves_zeros(patterns):
    """The cross-attention's mask lets the example read the encoder's padded keys: the attention is reverted at
    verification, and with it, the encoder regions that leave zeros there (no check would be left)."""
    model = hw.CrossAttending().eval()
    x, mask = hw.inputs(3, 9)
    y, cross = torch.randn(3, 5, hw.DIM), torch.ones_like(mask)
    opt = fxbt.optimize(model, (x, mask, y, cross), inplace=False, patterns=patterns, frontend="dynamo")
    reverted = [r for r in fxbt.report(opt).rows if "reading its padded positions was reverted" in r.reason]
    assert reverted and all(r.status == "rejected" for r in reverted), str(fxbt.report(opt))
    x, mask = hw.inputs(4, 11, seed=3)
    y = torch.randn(4, 6, hw.DIM)
    with torch.no_grad():
        assert max_error(model(x, mask, y, torch.ones_like(mask))[1], opt(x, mask, y, torch.ones_like(mask))[1]) < TOL


# --- 5: modes -------------------------------------------------------------------------------------------


def test_train_mode_runs_dropout_and_eval_mode_does_not():
    spec = zoo.SPECS["bert"]
    model = _bert(hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    optimized = fxbt.optimize(model, spec.example(), inplace=False)
    probe = spec.probe()
    optimized.train()
    with torch.no_grad():
        a, b = optimized(**probe).last_hidden_state, optimized(**probe).last_hidden_state
    assert (a - b).abs().max() > 1e-2  # dropout draws differ from call to call
    optimized.eval()
    with torch.no_grad():
        assert torch.equal(optimized(**probe).last_hidden_state, optimized(**probe).last_hidden_state)
        assert real_token_error(spec, reference(model, probe), optimized(**probe), probe) < TOL


def test_a_model_in_training_mode_is_captured_with_its_dropout():
    spec = zoo.SPECS["bert"]
    model = _bert(hidden_dropout_prob=0.1).train()
    optimized = fxbt.optimize(model, spec.example(), inplace=False)
    assert fxbt.report(optimized).rewritten("sdpa")
    torch.manual_seed(3)
    with torch.no_grad():
        optimized(**spec.probe())


# --- 6: edges --------------------------------------------------------------------------------------------


def test_a_query_row_with_every_key_masked_gives_nan_like_the_original():
    torch.manual_seed(0)
    model = hw.BmmMaskedFill().eval()  # masked_fill(-inf): a row with no key left is NaN in the original
    optimized = fxbt.optimize(model, hw.inputs(), inplace=False)
    x, mask = hw.inputs(3, 6, seed=1)
    mask[1] = 0
    with torch.no_grad():
        want, got = model(x, mask), optimized(x, mask)
    assert torch.isnan(want[1]).all() and torch.isnan(got[1]).all()
    assert max_error(want[[0, 2]], got[[0, 2]]) < TOL


@pytest.mark.parametrize("fill", [-1e9, -1e4])
def test_a_query_row_with_every_key_masked_by_a_finite_fill_is_exact(fill):
    """masked_fill with a finite value replaces scores: on a row with no key left the original averages the
    values. Large fills leave nothing for the scores to move (SDPA then agrees); smaller ones run the original."""

    class FiniteFill(hw.BmmMaskedFill):
        def forward(self, x, mask):
            b, s, _ = x.shape
            q, k, v = self.q(x), self.k(x), self.v(x)
            scores = (q @ k.transpose(-2, -1) * 30.0).masked_fill(mask[:, None, :] == 0, fill)
            return torch.softmax(scores, dim=-1) @ v

    torch.manual_seed(0)
    model = FiniteFill().eval()
    optimized = fxbt.optimize(model, hw.inputs(), frontend="fx", inplace=False)
    assert fxbt.report(optimized).rewritten("sdpa")
    x, mask = hw.inputs(3, 6, seed=1)
    mask[1] = 0
    with torch.no_grad():
        assert max_error(model(x, mask), optimized(x, mask)) < TOL


def test_a_batch_of_padding_only_gives_the_original_values():
    spec = zoo.SPECS["bert"]
    model = _bert()
    optimized = fxbt.optimize(model, spec.example(), inplace=False)
    inputs = spec.probe()
    inputs["attention_mask"].zero_()
    with torch.inference_mode():
        assert max_error(reference(model, inputs), optimized(**inputs)) < TOL  # every position, padded too


@pytest.mark.parametrize("name", ["bert", "gpt2"])  # GPT-2's guard divides by the batch ([batch·seq] linears)
@pytest.mark.parametrize("batch, seq", [(2, 0), (0, 5)])
def test_empty_batches_behave_as_the_original(name, batch, seq):
    spec = zoo.SPECS[name]
    model = _bert() if name == "bert" else spec.build()
    optimized = fxbt.optimize(model, spec.example(), inplace=False)
    inputs = {"input_ids": torch.ones(batch, seq, dtype=torch.long),
              "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    try:
        with torch.inference_mode():
            want = reference(model, inputs)
    except Exception:  # noqa: BLE001 - the original raises: fxbt raises a typed error
        with pytest.raises(fxbt.InputError, match="the model itself raises"):
            optimized(**inputs)
        return
    with torch.inference_mode():
        assert max_error(want, optimized(**inputs)) == 0.0


# --- 7: padded positions read back -------------------------------------------------------------------------


def test_a_stack_whose_output_is_convolved_over_positions_is_not_padding_free():
    torch.manual_seed(0)
    model = hw.ConvPooledStack().eval()
    optimized = fxbt.optimize(model, hw.inputs(3, 8), frontend="fx", inplace=False, encoder_impl="fused")
    rejected = fxbt.report(optimized).rejected("fused_encoder")
    assert len(rejected) == 2 and all("padded positions of its output are read" in r.reason for r in rejected)
    x, mask = hw.inputs(3, 11, seed=4)
    with torch.no_grad():
        assert max_error(model(x, mask), optimized(x, mask)) < TOL  # every position


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_pooler_reading_position_zero_sees_the_original_value(side):
    torch.manual_seed(0)
    model = hw.PoolerStack().eval()
    optimized = fxbt.optimize(model, hw.inputs(3, 8), frontend="fx", inplace=False, encoder_impl="fused")
    assert len(fxbt.report(optimized).rewritten("fused_encoder")) == 2
    x, mask = hw.inputs(3, 9, seed=5)
    if side == "left":
        mask = mask.flip(1)  # position 0 is padding in row 1
    with torch.no_grad():
        (want_h, want_pooled), (got_h, got_pooled) = model(x, mask), optimized(x, mask)
    assert (want_pooled - got_pooled).abs().max() < TOL
    assert ((want_h - got_h).abs() * mask[..., None]).max() < TOL
    blocks = [r for _, r in fxbt.region.regions(optimized) if r.kernel == "fused_encoder"]
    expected = "replacement" if side == "right" else "position 0 is padding in some row and is read after the stack"
    assert all(r.last_path == expected for r in blocks)


def _canine_inputs(batch, seq, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1:, seq // 2:] = 0
    return {"input_ids": torch.randint(100, 1000, (batch, seq), generator=g), "attention_mask": mask}


def test_canine_reads_padded_characters_back_and_stays_exact():
    config = transformers.CanineConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, downsampling_rate=4, num_hash_buckets=64,
                                       num_hash_functions=2, local_transformer_stride=4, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.CanineModel(config).eval()
    optimized = fxbt.optimize(model, _canine_inputs(2, 16, 1), inplace=False)
    inputs = _canine_inputs(3, 24, 2)
    with torch.inference_mode():
        want, got = reference(model, inputs), optimized(**inputs)
    real = inputs["attention_mask"][..., None]
    assert ((want.last_hidden_state - got.last_hidden_state).abs() * real).max() < TOL


def test_sew_with_an_attention_mask_stays_exact():
    config = transformers.SEWConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2),
                                    num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, squeeze_factor=2)
    torch.manual_seed(0)
    model = transformers.SEWModel(config).eval()

    def inputs(batch, samples, seed):
        mask = torch.ones(batch, samples, dtype=torch.long)
        mask[1:, samples // 2:] = 0
        return {"input_values": torch.randn(batch, samples, generator=torch.Generator().manual_seed(seed)),
                "attention_mask": mask}

    optimized = fxbt.optimize(model, inputs(2, 800, 1), inplace=False)
    probe = inputs(3, 1000, 2)
    with torch.inference_mode():
        want, got = reference(model, probe), optimized(**probe)
    frames = model._get_feature_vector_attention_mask(want.last_hidden_state.shape[1], probe["attention_mask"])
    assert ((want.last_hidden_state - got.last_hidden_state).abs() * frames[..., None]).max() < TOL


# --- 8: run-time assumptions that fail during verification decline, never crash ---------------------------


@pytest.mark.parametrize("kind", ["per_head", "keys_alibi", "local"])
def test_blocks_with_a_mask_that_is_not_key_padding_are_declined_with_the_reason(kind):
    torch.manual_seed(0)
    model = hw.BiasedStack(kind).eval()
    optimized = fxbt.optimize(model, hw.inputs(3, 8), frontend="fx", inplace=False, encoder_impl="fused")
    report = fxbt.report(optimized)
    assert not report.rewritten("fused_encoder") and report.rejected("fused_encoder")
    why = "differs per query" if kind == "local" else "differs per head"
    assert all(why in r.reason for r in report.rejected("fused_encoder")), str(report)
    x, mask = hw.inputs(2, 10, seed=3)
    with torch.no_grad():  # real tokens: the stack may run padding-free (zeros at padded positions)
        assert ((model(x, mask) - optimized(x, mask)).abs() * mask[..., None]).max().item() < TOL


def test_biogpt_causal_decoder_blocks_are_not_taken_for_encoder_blocks():
    config = transformers.BioGptConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, vocab_size=zoo.VOCAB, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BioGptModel(config).eval()
    spec = zoo.SPECS["gpt2"]
    optimized = fxbt.optimize(model, zoo.make_inputs(spec, 2, 8, pad=True, seed=1), inplace=False)
    assert not fxbt.report(optimized).rewritten("fused_encoder")
    probe = zoo.make_inputs(spec, 3, 11, pad=True, seed=2)
    with torch.inference_mode():
        assert real_token_error(spec, reference(model, probe), optimized(**probe), probe) < TOL


# --- 9: no process-wide side effects; threads ---------------------------------------------------------------


def test_optimize_does_not_make_other_compiled_code_recompile():
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    @torch.compile(backend=counting_backend, dynamic=False)
    def unrelated(x):
        return torch.sin(x) + 1

    unrelated(torch.randn(3))
    fxbt.optimize(hw.BmmMaskedFill().eval(), hw.inputs(), frontend="dynamo", inplace=False)
    unrelated(torch.randn(3))
    assert compiles == [1]


def test_optimize_from_several_threads_at_once():
    models = [hw.STYLES[i % len(hw.STYLES)]().eval() for i in range(4)]
    results, errors = [None] * 4, []

    def work(i):
        try:
            results[i] = fxbt.optimize(models[i], hw.inputs(), frontend="dynamo", inplace=False)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    x, mask = hw.inputs(3, 9, seed=2)
    with torch.no_grad():
        assert all(((m(x, mask) - r(x, mask)).abs() * mask[..., None]).max().item() < TOL  # real tokens
                   for m, r in zip(models, results))


def test_registering_patterns_and_fx_capture_leave_other_threads_forwards_alone():
    model = hw.BmmMaskedFill().eval()
    x, mask = hw.inputs()
    with torch.no_grad():
        want = model(x, mask)
    call = torch.nn.Module.__call__
    errors, stop = [], threading.Event()

    def forwards():
        while not stop.is_set():
            try:
                with torch.no_grad():
                    assert torch.equal(model(x, mask), want)
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)
                return

    runner = threading.Thread(target=forwards)
    runner.start()
    try:
        for i in range(20):
            fxbt.register_pattern(f"threads_{i}", lambda t: torch.relu(t) * 2, lambda t: torch.relu(t) * 2)
            fxbt.unregister_pattern(f"threads_{i}")
        for style in [s for s in hw.STYLES if getattr(s, "fx_traceable", True)]:
            fxbt.optimize(style().eval(), hw.inputs(), frontend="fx", inplace=False)
    finally:
        stop.set()
        runner.join()
    assert not errors, errors
    assert torch.nn.Module.__call__ is call


class _CacheOnlyCall(nn.Module):
    """Computes a call whose mask is shorter than its input only with ``config.use_cache`` on (as GPT-2 does on
    transformers 5), and capture runs models with it off."""

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(use_cache=True)
        self.lin = nn.Linear(8, 8)

    def forward(self, x, mask):
        if mask.shape[1] != x.shape[1] and not self.config.use_cache:
            raise ValueError("the mask does not cover the input")
        return self.lin(x).sum(1) * mask.sum(1, keepdim=True)


def test_a_call_the_model_computes_only_with_its_cache_is_the_models_own():
    model = _CacheOnlyCall().eval()
    optimized = fxbt.optimize(model, (torch.randn(2, 5, 8), torch.ones(2, 5)), inplace=False)
    x, short = torch.randn(3, 7, 8), torch.ones(3, 4)
    with torch.no_grad():
        assert torch.equal(optimized(x, short), model(x, short))
    assert any("the model raised when run for capture" in why for why in fxbt.report(optimized).original_calls)
    with pytest.raises(fxbt.InputError, match="the model itself raises"):  # and where the model raises, typed
        optimized(x, torch.ones(3, 4, 2))
