"""Real English sentences without a download: the help topics Python ships in ``pydoc_data.topics``
(the text of ``help("if")``, ``help("with")``... taken from the language reference).

Topics in sorted order, paragraphs split on blank lines; indented paragraphs (code, grammar) and those with
``>>>`` are dropped; the rest is split into sentences after ``.``, ``!`` or ``?`` followed by a capital
letter; a sentence is kept if it has at least 3 words, ends with ``.``, ``!`` or ``?`` and has no ``**``,
``::``, ``==``; duplicates dropped, first kept. ``sentences(n)`` takes ``n`` of them evenly spread over
that list (deterministic for a given Python version: 1,360 sentences of 3 to 201 words on Python 3.11).
"""
from __future__ import annotations

import hashlib
import re


def all_sentences() -> list[str]:
    from pydoc_data.topics import topics

    found = []
    for name in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[name]):
            if para.startswith((" ", "\t")) or ">>>" in para:
                continue
            for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(para.split())):
                if len(s.split()) >= 3 and s[-1] in ".!?" and not re.search(r"\*\*|::|==", s):
                    found.append(s)
    return list(dict.fromkeys(found))


def sentences(n: int) -> list[str]:
    every = all_sentences()
    if n > len(every):
        raise ValueError(f"only {len(every)} sentences in pydoc_data.topics")
    return [every[i * len(every) // n] for i in range(n)]


def describe(texts: list[str]) -> dict:
    words = sorted(len(s.split()) for s in texts)
    return {"sentences": len(texts), "source": "pydoc_data.topics (bench/sentences.py)",
            "words_min": words[0], "words_median": words[len(words) // 2], "words_max": words[-1],
            "sha256": hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]}


if __name__ == "__main__":
    texts = sentences(1024)
    print(describe(texts))
    for s in texts[:5]:
        print(s)
