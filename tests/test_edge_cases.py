"""The bad-input and edge-case matrix: each row is either correct or a typed fxbt error saying what to do."""
from __future__ import annotations

import copy
import io
import pickle
import threading

import pytest
import torch

import fxbt
import zoo
from conftest import reference
from test_encoder import real_token_error

TOL = 1e-5


@pytest.fixture(scope="module")
def bert():
    spec = zoo.SPECS["bert"]
    model = spec.build()
    return spec, model, fxbt.optimize(model, spec.example(), inplace=False)


def _close(spec, model, gm, inputs, tol=TOL):
    with torch.inference_mode():
        return real_token_error(spec, reference(model, inputs), gm(**inputs), inputs) < tol


@pytest.mark.parametrize("change, why", [
    (lambda x: {"input_ids": x["input_ids"]}, "input attention_mask not given"),
    (lambda x: dict(x, attention_mask=x["attention_mask"].bool()), "input attention_mask is a 2-d bool tensor"),
    (lambda x: dict(x, input_ids=x["input_ids"].int()), "input input_ids is a 2-d int32 tensor"),
    (lambda x: dict(x, token_type_ids=torch.zeros_like(x["input_ids"])), "input token_type_ids given"),
    (lambda x: dict(x, output_hidden_states=True), "input output_hidden_states given"),
    (lambda x: dict(x, return_dict=False), "input return_dict given"),
])
def test_calls_of_other_kinds_than_the_example_get_a_specialization(bert, change, why):
    spec, model, _ = bert
    # an optimized copy of its own: a call asking for hidden states makes transformers 5 leave recording hooks on
    # the layers, and every later capture of that model is refused (calls then run through torch.compile)
    gm = fxbt.optimize(model, spec.example(), inplace=False)
    inputs = change(spec.probe())
    with torch.inference_mode():
        want, got = reference(model, inputs), gm(**inputs)
    assert type(got) is type(want)
    assert real_token_error(spec, want, got, inputs) < TOL
    history = fxbt.report(gm).history  # transformers 5 keeps hooks on the layers once hidden states were asked for:
    assert any(why in h or "forward hooks on" in h for h in history), history  # then torch.compile serves calls


@pytest.mark.parametrize("call", [
    lambda gm, x: gm(input_ids=x["input_ids"].tolist(), attention_mask=x["attention_mask"]),
    lambda gm, x: gm(input_ids=x["input_ids"].float(), attention_mask=x["attention_mask"]),
    lambda gm, x: gm(x["input_ids"], x["attention_mask"], input_ids=x["input_ids"]),
])
def test_calls_the_model_itself_rejects_raise_input_error(bert, call):
    spec, _, gm = bert
    with pytest.raises(fxbt.InputError):
        call(gm, spec.probe())


def test_positional_call_works_like_the_model(bert):
    spec, model, gm = bert
    x = spec.probe()
    with torch.inference_mode():
        got = gm(x["input_ids"], x["attention_mask"])
    assert real_token_error(spec, reference(model, x), got, x) < TOL


@pytest.mark.parametrize("batch, seq", [(1, 1), (1, 2), (5, 1), (2, 60)])
def test_batch_one_sequence_one_and_much_longer_than_the_example(bert, batch, seq):
    spec, model, gm = bert
    assert _close(spec, model, gm, zoo.make_inputs(spec, batch, seq, pad=True, seed=batch * seq))


@pytest.mark.parametrize("dtype", ["long", "bool", "float"])
def test_boolean_integer_and_float_masks(dtype):
    spec = zoo.SPECS["bert"]
    model = spec.build()
    example = spec.example()
    convert = {"long": lambda m: m, "bool": lambda m: m.bool(), "float": lambda m: m.float()}[dtype]
    example["attention_mask"] = convert(example["attention_mask"])
    gm = fxbt.optimize(model, example)
    probe = spec.probe()
    probe["attention_mask"] = convert(probe["attention_mask"])
    report = fxbt.report(gm)
    assert len(report.rewritten("sdpa")) == zoo.L and len(report.rewritten("padding_free")) == 1, str(report)
    assert _close(spec, model, gm, probe)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype):
    spec = zoo.SPECS["bert"]
    model = spec.build().to(dtype)
    gm = fxbt.optimize(model, spec.example())
    assert fxbt.report(gm).rewritten("sdpa")
    assert _close(spec, model, gm, spec.probe(), tol=2e-2)


def test_calls_under_autocast(bert):
    spec, model, gm = bert
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _close(spec, model, gm, spec.probe(), tol=5e-2)


def test_deepcopy_state_dict_and_pickle_round_trips(bert):
    spec, model, optimized = bert
    probe = spec.probe()
    with torch.inference_mode():
        want = reference(model, probe).last_hidden_state
    optimized.load_state_dict(optimized.state_dict())  # the model's own keys, loaded back as they are
    assert set(optimized.state_dict()) == set(model.state_dict())
    # like nn.Module.compile(): a copy is the plain model, computing exactly what the original does
    clone = copy.deepcopy(optimized)
    assert fxbt.optimized.installed(clone) is None and fxbt.optimized.installed(optimized) is not None
    with torch.inference_mode():
        assert torch.equal(clone(**probe).last_hidden_state, want)
    fxbt.optimize(clone, spec.example())
    with torch.inference_mode():
        assert real_token_error(spec, want, clone(**probe).last_hidden_state, probe) < TOL
    assert fxbt.report(clone).rewritten("padding_free")
    gm = fxbt.api.graph_module(optimized)  # the rewritten graph pickles with fxbt's metadata
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.inference_mode():
        assert torch.equal(loaded(**probe).last_hidden_state, gm(**probe).last_hidden_state)
        assert torch.equal(pickle.loads(pickle.dumps(gm))(**probe).last_hidden_state, gm(**probe).last_hidden_state)
    decisions = lambda report: [(r.region, r.pattern, r.status, r.reason) for r in report.rows]  # noqa: E731
    assert decisions(fxbt.report(loaded)) == decisions(fxbt.report(gm))
    with torch.inference_mode():  # node metadata survives: unroll still gives the captured graph
        assert torch.equal(fxbt.unroll(loaded)(**probe).last_hidden_state, want)


def test_to_another_dtype_after_optimizing():
    spec = zoo.SPECS["bert"]
    model = spec.build()
    gm = fxbt.optimize(model, spec.example()).to(torch.float64)  # the model itself: .to() is its own
    assert gm is model
    assert _close(spec, model, gm, spec.probe(), tol=1e-9)
    assert "dtype" in fxbt.report(gm).history[-2]  # the float32 graph was dropped, a float64 one made


def test_concurrent_calls_from_several_threads(bert):
    spec, model, gm = bert
    inputs = [zoo.make_inputs(spec, 2 + i % 3, 6 + i, pad=True, seed=i) for i in range(6)]
    with torch.inference_mode():
        wants = [reference(model, x) for x in inputs]
    errors, results = [], [None] * len(inputs)

    def work(i):
        try:
            with torch.inference_mode():
                results[i] = gm(**inputs[i])
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(real_token_error(spec, w, r, x) < TOL for w, r, x in zip(wants, results, inputs))


def test_blocks_with_rotary_or_relative_positions_are_not_fused():
    for name in ("llama", "t5"):  # rotary embeddings; relative position bias
        spec = zoo.SPECS[name]
        model = spec.build()
        gm = fxbt.optimize(model, spec.example())
        report = fxbt.report(gm)
        assert not report.rewritten("fused_encoder")
        assert len(report.rewritten("sdpa")) == spec.attention_sites
        probe = spec.probe()
        with torch.inference_mode():
            want, got = reference(model, probe), gm(**probe)
        diff = (want[0] - got[0]).abs()
        if diff.shape[:2] == probe["attention_mask"].shape:  # llama's stack runs padding-free: padded positions are 0
            diff = diff * probe["attention_mask"][..., None]
        assert diff.max().item() < TOL
