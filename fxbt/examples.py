"""Example inputs built from a model's signature and config, for ``fxbt.optimize(model)`` without an example.

Like Optimum's dummy input generators: token ids inside the vocabulary with an attention mask that pads
the second row (so the example exercises padding removal), pixel values at the config's image size and
channels, audio samples, or mel features for a speech encoder. A model that takes none of these gets no
built example: its first call is captured instead.
"""
from __future__ import annotations

import inspect

import torch

BATCH, SEQ = 2, 16


def example_for(model: torch.nn.Module, batch: int = BATCH, seq: int = SEQ) -> dict | None:
    """Keyword inputs for ``model``'s forward, or None when its inputs cannot be told from its signature."""
    params = inspect.signature(model.forward).parameters
    config = getattr(model, "config", None)
    g = torch.Generator().manual_seed(0)
    if "input_ids" in params:
        inputs = _text(config, params, g, batch, seq)
    elif "pixel_values" in params:
        inputs = {"pixel_values": torch.randn(batch, _get(config, "num_channels", 3), *_image_size(config), generator=g)}
    elif "input_features" in params:
        frames = 2 * _get(config, "max_source_positions", 1500)
        inputs = {"input_features": torch.randn(batch, _get(config, "num_mel_bins", 80), frames, generator=g)}
        if "decoder_input_ids" in params:
            inputs["decoder_input_ids"] = _ids(config, batch, 4, g)
    elif "input_values" in params:
        inputs = {"input_values": torch.randn(batch, 100 * seq, generator=g)}
    else:
        return None
    device = _device(model)
    return {k: v.to(device) for k, v in inputs.items()}


def _text(config, params, g, batch: int, seq: int) -> dict:
    seq = min(seq, _get(config, "max_position_embeddings", seq) or seq)
    inputs = {"input_ids": _ids(config, batch, seq, g)}
    if "attention_mask" in params:
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[1:, seq - seq // 4:] = 0  # every row but the first padded: the example exercises padding removal
        inputs["attention_mask"] = mask
    if "decoder_input_ids" in params and _get(config, "is_encoder_decoder", False):
        dec = max(2, seq // 2)
        inputs["decoder_input_ids"] = _ids(config, batch, dec, g)
        if "decoder_attention_mask" in params:
            inputs["decoder_attention_mask"] = torch.ones(batch, dec, dtype=torch.long)
    return inputs


def _ids(config, batch, seq, g) -> torch.Tensor:
    vocab = _get(config, "vocab_size", 1000) or 1000
    low = min(3, vocab - 1)  # clear of the usual special tokens (pad, bos, eos)
    return torch.randint(low, vocab, (batch, seq), generator=g)


def _image_size(config) -> tuple[int, int]:
    size = _get(config, "image_size", 224)
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def _get(config, name, default):
    value = getattr(config, name, None) if config is not None else None
    return default if value is None else value


def _device(model) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")
