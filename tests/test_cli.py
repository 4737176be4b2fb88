"""The fxbt command: --help explains each subcommand; optimize prints the report; every user mistake is
one ``fxbt: ...`` line on stderr saying what to do, exit status 2, and a bad --out is found before the work."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import zoo
from fxbt import cli


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
    assert "captured with" in out.stdout and "padding_free" in out.stdout and "sdpa" in out.stdout
    assert f"{zoo.L + 1} rewritten" in out.stdout  # each attention, and the stack around them on real tokens


def test_a_decoder_config_exports_its_graph(tmp_path):
    """GPT-2's config has use_cache=True, with which the model returns a KV cache that no graph returns: the
    command builds it with the cache off, so there is one graph to report and export."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(zoo.SPECS["gpt2"].build(use_cache=True).config.to_dict()))
    out = run("export", str(path), "--format", "python", "--out", str(tmp_path / "out"), "--batch", "2", "--seq", "8")
    assert out.returncode == 0, out.stderr
    assert "padding_free" in out.stdout and (tmp_path / "out" / "module.py").is_file()


def test_a_bad_path_is_one_clear_line(tmp_path):
    out = run("optimize", str(tmp_path / "missing.json"))
    assert out.returncode == 2 and out.stderr.startswith("fxbt: ") and "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1 and "does not exist" in out.stderr


def test_a_bad_number_is_one_clear_line():
    out = run("optimize", "config.json", "--batch", "0")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("fxbt: argument --batch: pass a whole number of 1 or more")


def bert_config(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(zoo.SPECS["bert"].build().config.to_dict()))
    return path


def mistake(tmp: Path, case: str) -> tuple[list[str], str]:
    """The command line of one user mistake, and what its one line must say."""
    (tmp / "no_type.json").write_text(json.dumps({"hidden_size": 32}))
    (tmp / "not_json.json").write_text("hidden_size = 32\n")
    (tmp / "a_file").write_text("x")
    config = str(bert_config(tmp / "no_weights"))
    return {
        "config without model_type": (["optimize", str(tmp / "no_type.json")], 'has no "model_type"'),
        "not JSON": (["optimize", str(tmp / "not_json.json")], "is not JSON"),
        "folder without weights": (["optimize", str(tmp / "no_weights")], f"pass its config.json instead: {config}"),
        "missing path": (["export", str(tmp / "nowhere"), "--out", str(tmp / "o")], "does not exist"),
        "batch 0": (["optimize", config, "--batch", "0"], "--batch: pass a whole number of 1 or more"),
        "seq 0": (["optimize", config, "--seq", "0"], "--seq: pass a whole number of 1 or more"),
        "negative batch": (["export", config, "--out", str(tmp / "o"), "--batch", "-2"], "--batch: pass a whole"),
        "negative seq": (["optimize", config, "--seq", "-3"], "--seq: pass a whole number of 1 or more"),
        "repeats 0": (["demo", "--repeats", "0"], "--repeats: pass a whole number of 1 or more"),
        "out inside a file": (["export", config, "--out", str(tmp / "a_file" / "g.json"), "--format", "json"],
                              "is a file, not a folder"),
        "missing --out": (["export", config], "required: --out (see fxbt export --help)"),
    }[case]


@pytest.mark.parametrize("case", ["config without model_type", "not JSON", "folder without weights", "missing path",
                                  "batch 0", "seq 0", "negative batch", "negative seq", "repeats 0",
                                  "out inside a file", "missing --out"])
def test_a_user_mistake_is_one_line_that_says_what_to_do(tmp_path, capsys, case):
    argv, says = mistake(tmp_path, case)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxbt: ") and err.count("\n") == 1 and says in err, err


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder this process cannot write in: a read-only folder, or, as root (whom permission bits do not
    stop), /proc/sys, which Linux mounts read-only."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        yield folder
    elif os.path.isdir("/proc/sys") and not os.access("/proc/sys", os.W_OK):
        yield Path("/proc/sys")
    else:
        pytest.skip("no unwritable folder for this user here")
    folder.chmod(0o755)


@pytest.mark.parametrize("fmt", ["python", "json"])
def test_an_unwritable_out_is_refused_before_the_model_is_built(tmp_path, capsys, monkeypatch, unwritable_dir, fmt):
    def not_yet(path):
        raise AssertionError("the model was built before --out was checked")

    monkeypatch.setattr(cli, "load_model", not_yet)
    config = str(bert_config(tmp_path))
    assert cli.main(["export", config, "--format", fmt, "--out", str(unwritable_dir / "exported")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("fxbt: cannot write") and "not writable" in captured.err
    assert captured.err.count("\n") == 1 and captured.out == ""


def test_export_replaces_an_existing_out_only_with_overwrite(tmp_path, capsys):
    config, out = str(bert_config(tmp_path)), tmp_path / "graph.dot"
    out.write_text("an earlier graph")
    assert cli.main(["export", config, "--format", "dot", "--out", str(out), "--seq", "8"]) == 2
    assert "pass overwrite=True (fxbt export --overwrite)" in capsys.readouterr().err
    assert out.read_text() == "an earlier graph"
    assert cli.main(["export", config, "--format", "dot", "--out", str(out), "--seq", "8", "--overwrite"]) == 0
    assert out.read_text().startswith("digraph")


def test_export_writes_the_graph(tmp_path):
    config = zoo.SPECS["bert"].build().config
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    out = run("export", str(path), "--format", "json", "--out", str(tmp_path / "g.json"), "--seq", "8")
    assert out.returncode == 0, out.stderr
    regions = [n for n in json.loads((tmp_path / "g.json").read_text())["nodes"] if n.get("region")]
    assert [n["kernel"] for n in regions] == ["padding_free"]  # the stack, its attentions inside it
