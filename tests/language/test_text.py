"""Corpus loaders: the KJV parser on the `bible` program's layout, and the help topics."""

from __future__ import annotations

import shutil

import pytest

from exitguard.data.text import parse_kjv, pydoc_topics_text, text_passages

SAMPLE = """
Genesis 1

  1 In the beginning God created the heaven and the earth.
  2 And the earth was without form, and void; and darkness was upon the face of
the deep. And the Spirit of God moved upon the face of the waters.

Song of Solomon 2

  1 I am the rose of Sharon, and the lily of the valleys.
"""


def test_parse_kjv_joins_wrapped_verses():
    verses = parse_kjv(SAMPLE)
    assert [v.reference for v in verses] == ["Genesis 1:1", "Genesis 1:2", "Song of Solomon 2:1"]
    assert verses[1].text == (
        "And the earth was without form, and void; and darkness was upon the face of "
        "the deep. And the Spirit of God moved upon the face of the waters."
    )


@pytest.mark.skipif(shutil.which("bible") is None, reason="Debian bible-kjv is not installed")
def test_kjv_new_testament():
    from exitguard.data.text import kjv_verses

    verses = kjv_verses("john3:16-john3:17")
    assert verses[0].reference == "John 3:16"
    assert verses[0].text.startswith("For God so loved the world")


def test_pydoc_corpus_is_real_text():
    text = pydoc_topics_text()
    assert len(text) > 100_000 and "assert" in text
    passages = text_passages("pydoc")
    assert len(passages) > 500 and all(len(p) >= 40 for p in passages)


def test_unknown_corpus_is_rejected():
    with pytest.raises(ValueError, match="`corpus` must be one of"):
        text_passages("shakespeare")
