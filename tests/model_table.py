"""Render the README's supported-model table from the rows the model tests wrote.

    FXBT_TABLE=models-transformers4.json python -m pytest tests/test_attention_models.py   # in a 4.57.6 venv
    FXBT_TABLE=models-transformers5.json python -m pytest tests/test_attention_models.py   # in a 5.x venv
    python tests/model_table.py        # rewrites the table between the markers in README.md
"""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- model-table:begin -->", "<!-- model-table:end -->"


def render() -> str:
    runs = {}
    for path in sorted((ROOT / "tests" / "results").glob("models-*.json")):
        for row in json.loads(path.read_text()):
            runs.setdefault(row["model"], {})[row["transformers"]] = row
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
    table = f"{BEGIN}\n{render()}\n{END}"
    readme.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: table, text, flags=re.S))


if __name__ == "__main__":
    main()
