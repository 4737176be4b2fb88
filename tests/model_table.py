"""Render the README's supported-model tables from the rows the model tests wrote: transformers architectures
(tests/test_attention_models.py) and attention not from transformers (tests/test_pytorch_modules.py).

    FXBT_TABLE=models-transformers4.json python -m pytest tests/test_attention_models.py tests/test_pytorch_modules.py
    FXBT_TABLE=models-transformers5.json python -m pytest tests/test_attention_models.py tests/test_pytorch_modules.py
    python tests/model_table.py        # rewrites the tables between the markers in README.md
"""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- model-table:begin -->", "<!-- model-table:end -->"
STYLE_BEGIN, STYLE_END = "<!-- style-table:begin -->", "<!-- style-table:end -->"


def _rows(key: str) -> dict:
    """{name: {transformers version: row}} for the rows naming ``key`` ("model" or "style")."""
    runs = {}
    for path in sorted((ROOT / "tests" / "results").glob("models-*.json")):
        for row in json.loads(path.read_text()):
            if key in row:
                runs.setdefault(row[key], {})[row["transformers"]] = row
    return runs


def render_styles() -> str:
    runs = _rows("style")
    versions = sorted({v for rows in runs.values() for v in rows})
    lines = ["| attention | " + " | ".join(f"transformers {v}" for v in versions) + " |", "|---|" + "---|" * len(versions)]
    for style in sorted(runs):
        cells = []
        for v in versions:
            row = runs[style].get(v)
            parts = [f"{row[k]} {label}" for k, label in (("sdpa", "SDPA"), ("fused", "fused"),
                                                         ("padding_free", "padding-free")) if row and row[k]]
            cells.append("not run" if row is None else f"{', '.join(parts)} ({row['frontend']}), err {row['max_err']:.0e}")
        lines.append(f"| {style} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render() -> str:
    runs = _rows("model")
    versions = sorted({v for rows in runs.values() for v in rows})
    head = "| model | " + " | ".join(f"transformers {v}" for v in versions) + " |"
    lines = [head, "|---|" + "---|" * len(versions)]
    for model in sorted(runs):
        cells = []
        for v in versions:
            row = runs[model].get(v)
            cells.append("not run" if row is None else
                         f"{row['sdpa']}/{row['sites']} SDPA ({row['frontend']}"
                         f"{', ' + str(row['causal']) + ' is_causal' if row['causal'] else ''}), "
                         f"err {row['max_err']:.0e}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for begin, end, table in ((BEGIN, END, render()), (STYLE_BEGIN, STYLE_END, render_styles())):
        block = f"{begin}\n{table}\n{end}"
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    readme.write_text(text)


if __name__ == "__main__":
    main()
