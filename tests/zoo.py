"""Small transformers models built from configs, with example and probe inputs.

Every model here is tiny (hidden 32, 2 layers) so the whole zoo builds and runs in seconds. ``example``
is what `optimize` traces with; ``probe`` has other batch sizes, sequence lengths and padding, which
is what the optimized module must also get right.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch
import transformers
from transformers import AutoConfig, AutoModel

H, L, HEADS, FF = 32, 2, 4, 64
VOCAB = 99


@dataclass(frozen=True)
class Spec:
    """A model from a config. ``encoder_blocks``: blocks the encoder fusion must fuse (None: not an
    encoder test model); ``declined``: the reason its blocks are declined instead."""

    name: str
    model_type: str
    config: dict
    inputs: str  # "text", "text_causal", "seq2seq", "image", "audio", "whisper"
    attention_sites: int  # softmax attentions in the model
    model_class: str | None = None  # an Auto class other than AutoModel, or a model class name
    encoder_blocks: int | None = None
    declined: str | None = None

    def build(self, attn="eager", **overrides) -> torch.nn.Module:
        """The model, its KV cache off unless ``use_cache=True`` is given: a decoder called with its cache on
        returns the cache, and fxbt serves such calls through torch.compile (tests/test_kv_cache.py)."""
        config = AutoConfig.for_model(self.model_type, **{"use_cache": False, **self.config, **overrides})
        torch.manual_seed(0)
        cls = getattr(transformers, self.model_class) if self.model_class else AutoModel
        build = cls._from_config if hasattr(cls, "_from_config") else cls.from_config
        model = build(config, attn_implementation=attn) if attn else build(config)
        return model.eval()

    def example(self, batch=2, seq=8, pad=True):
        return make_inputs(self, batch, seq, pad, seed=1)

    def probe(self, batch=3, seq=11, pad=True):
        return make_inputs(self, batch, seq, pad, seed=2)


def _mask(batch, seq, pad, left=False):
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad and batch > 1:
        for row in range(1, batch):
            real = max(1, seq - 2 * row)
            if left:
                mask[row, : seq - real] = 0
            else:
                mask[row, real:] = 0
    return mask


def make_inputs(spec: Spec, batch, seq, pad, seed=0, left=False) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = _mask(batch, seq, pad, left)
    if spec.inputs == "text":
        return {"input_ids": ids, "attention_mask": mask}
    if spec.inputs == "text_causal":
        return {"input_ids": ids, "attention_mask": mask}
    if spec.inputs == "seq2seq":
        dec = torch.randint(3, VOCAB, (batch, max(2, seq - 3)), generator=g)
        # transformers 4.57 BART builds a causal mask one column too wide when tracing without this
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec,
                "decoder_attention_mask": torch.ones_like(dec)}
    if spec.inputs == "image":
        size = spec.config.get("image_size", 32)
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=g)}
    if spec.inputs == "audio":
        return {"input_values": torch.randn(batch, 400 + 40 * seq, generator=g)}
    if spec.inputs == "whisper":
        frames = 2 * spec.config["max_source_positions"]
        feats = torch.randn(batch, spec.config["num_mel_bins"], frames, generator=g)
        dec = torch.randint(3, VOCAB, (batch, max(2, seq - 3)), generator=g)
        return {"input_features": feats, "decoder_input_ids": dec}
    raise ValueError(spec.inputs)


_BERTISH = dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS, intermediate_size=FF,
                vocab_size=VOCAB, max_position_embeddings=64)
_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DEC = dict(vocab_size=VOCAB, max_position_embeddings=64, **_TOKENS)
_LLAMA = dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS, num_key_value_heads=2,
              intermediate_size=FF, **_DEC)
_SEQ2SEQ = dict(d_model=H, encoder_layers=L, decoder_layers=L, encoder_attention_heads=HEADS,
                decoder_attention_heads=HEADS, encoder_ffn_dim=FF, decoder_ffn_dim=FF, **_DEC)

SPECS = {
    s.name: s
    for s in [
        Spec("bert", "bert", _BERTISH, "text", L),
        Spec("roberta", "roberta", dict(_BERTISH, pad_token_id=1), "text", L),
        Spec("xlm-roberta", "xlm-roberta", dict(_BERTISH, pad_token_id=1), "text", L),
        Spec("distilbert", "distilbert", dict(dim=H, n_layers=L, n_heads=HEADS, hidden_dim=FF, vocab_size=VOCAB,
                                              max_position_embeddings=64), "text", L),
        Spec("albert", "albert", dict(_BERTISH, embedding_size=16), "text", L),
        Spec("electra", "electra", dict(_BERTISH, embedding_size=16), "text", L),
        Spec("vit", "vit", dict(_BERTISH, image_size=32, patch_size=8), "image", L),
        Spec("gpt2", "gpt2", dict(n_embd=H, n_layer=L, n_head=HEADS, n_positions=64, vocab_size=VOCAB, **_TOKENS), "text_causal", L),
        Spec("gpt-neo", "gpt_neo", dict(hidden_size=H, num_layers=L, num_heads=HEADS, attention_types=[[["global", "local"], 1]],
                                        window_size=4, **_DEC), "text_causal", L),
        Spec("gptj", "gptj", dict(n_embd=H, n_layer=L, n_head=HEADS, rotary_dim=4, n_positions=64, vocab_size=VOCAB),
             "text_causal", L),
        Spec("opt", "opt", dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS, ffn_dim=FF,
                                word_embed_proj_dim=H, **_DEC), "text_causal", L),
        Spec("bloom", "bloom", dict(hidden_size=H, n_layer=L, n_head=HEADS, vocab_size=VOCAB), "text_causal", L),
        # masks its scores in place (``scores.masked_fill_(mask.expand_as(scores), min)``), concatenates an empty cache
        Spec("xlm", "xlm", dict(emb_dim=H, n_layers=L, n_heads=HEADS, vocab_size=VOCAB, max_position_embeddings=64),
             "text", L),
        Spec("bart", "bart", _SEQ2SEQ, "seq2seq", 3 * L),
        Spec("t5", "t5", dict(d_model=H, d_kv=8, d_ff=FF, num_layers=L, num_heads=HEADS, vocab_size=VOCAB), "seq2seq", 3 * L),
        Spec("llama", "llama", _LLAMA, "text_causal", L),
        Spec("mistral", "mistral", dict(_LLAMA, sliding_window=None), "text_causal", L),
        Spec("clip-text", "clip_text_model", dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS,
                                                   intermediate_size=FF, **_DEC), "text", L, model_class="CLIPTextModel"),
        Spec("deit", "deit", dict(_BERTISH, image_size=32, patch_size=8), "image", L),
        Spec("wav2vec2", "wav2vec2", dict(_BERTISH, conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2),
                                          num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                                          do_stable_layer_norm=False), "audio", L),
        Spec("mbart", "mbart", _SEQ2SEQ, "seq2seq", 3 * L),
        Spec("clip-vision", "clip_vision_model", dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS,
                                                       intermediate_size=FF, image_size=32, patch_size=8),
             "image", L, model_class="CLIPVisionModel"),
        Spec("whisper", "whisper", dict(d_model=H, encoder_layers=L, decoder_layers=L, encoder_attention_heads=HEADS,
                                        decoder_attention_heads=HEADS, encoder_ffn_dim=FF, decoder_ffn_dim=FF,
                                        vocab_size=VOCAB, num_mel_bins=8, max_source_positions=16,
                                        max_target_positions=32, decoder_start_token_id=1, **_TOKENS),
             "whisper", 3 * L),
    ]
}


# in the zoo for the encoder tests; the attention tests cover the architectures the attention issue lists
ENCODER_ONLY = {"deit", "wav2vec2", "mbart", "clip-vision"}

# encoder test models: name -> (config overrides, blocks to fuse or the reason they are declined)
ENCODERS = {
    "bert": ({}, L), "roberta": ({}, L), "xlm-roberta": ({}, L), "electra": ({}, L), "distilbert": ({}, L),
    "vit": ({}, L), "deit": ({}, L), "wav2vec2": ({}, L), "bart": ({}, L), "mbart": ({}, L),
    "albert": ({"hidden_act": "gelu"}, L),
}
ENCODER_DECLINED = {
    "albert": ({}, "tanh approximation of gelu"),
    "clip-vision": ({}, "quick-gelu"),
}


def build(name: str, attn="eager", **overrides):
    return SPECS[name].build(attn, **overrides)


def transformers_major() -> int:
    return int(transformers.__version__.split(".")[0])

