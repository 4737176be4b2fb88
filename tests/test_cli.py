"""The fxbt command: --help explains each subcommand; optimize prints the report; errors are one line."""
from __future__ import annotations

import json
import subprocess
import sys

import zoo


def run(*args):
    return subprocess.run([sys.executable, "-m", "fxbt.cli", *args], capture_output=True, text=True)


def test_help_explains_each_subcommand():
    out = run("--help")
    assert out.returncode == 0 and all(c in out.stdout for c in ("optimize", "export", "demo"))
    sub = run("optimize", "--help")
    assert "config.json" in sub.stdout and "--encoder-impl" in sub.stdout


def test_optimize_a_config_prints_the_report(tmp_path):
    config = zoo.SPECS["bert"].build().config
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    out = run("optimize", str(path), "--batch", "2", "--seq", "8")
    assert out.returncode == 0, out.stderr
    assert "captured with" in out.stdout and "fused_encoder" in out.stdout and "sdpa" in out.stdout
    assert f"{2 * zoo.L} rewritten" in out.stdout


def test_a_bad_path_is_one_clear_line(tmp_path):
    out = run("optimize", str(tmp_path / "missing.json"))
    assert out.returncode == 2 and out.stderr.startswith("fxbt: ") and "Traceback" not in out.stderr


def test_export_writes_the_graph(tmp_path):
    config = zoo.SPECS["bert"].build().config
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    out = run("export", str(path), "--format", "json", "--out", str(tmp_path / "g.json"), "--seq", "8")
    assert out.returncode == 0, out.stderr
    assert sum(1 for n in json.loads((tmp_path / "g.json").read_text())["nodes"] if n.get("region")) == zoo.L
