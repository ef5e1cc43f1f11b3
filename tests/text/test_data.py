"""King James verses labelled by genre: the label set, the chapter split, the sampling."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from exitguard.data.text import Verse
from exitguard.tasks.text.data import (
    BOOK_GENRE,
    GENRES,
    TextDataset,
    kjv_genres,
    label_verses,
    sample,
    split_by_chapter,
)


def _verses():
    """Four chapters of three books, 2 to 5 verses each."""
    spec = [("Genesis", 1, 3), ("Genesis", 2, 5), ("Psalms", 23, 4), ("John", 11, 2)]
    return [
        Verse(book, chapter, number, f"{book} {chapter} verse {number}")
        for book, chapter, count in spec
        for number in range(1, count + 1)
    ]


def test_every_book_has_one_of_six_genres():
    assert len(BOOK_GENRE) == 66
    assert set(BOOK_GENRE.values()) == set(GENRES)
    assert GENRES == ("law", "history", "poetry", "prophets", "gospels", "epistles")
    assert BOOK_GENRE["Acts"] == "history" and BOOK_GENRE["Revelation"] == "prophets"
    assert BOOK_GENRE["Song of Solomon"] == "poetry" and BOOK_GENRE["Jude"] == "epistles"


def test_label_verses_groups_by_chapter():
    data = label_verses(_verses())
    assert len(data) == 14 and data.class_names == GENRES
    assert data.labels.tolist() == [0] * 8 + [2] * 4 + [4] * 2
    assert data.groups.tolist() == [0] * 3 + [1] * 5 + [2] * 4 + [3] * 2
    assert data.references[8] == "Psalms 23:1"
    assert data.class_counts().tolist() == [8, 0, 4, 0, 2, 0]
    assert data.largest_class_share() == pytest.approx(8 / 14)
    with pytest.raises(ValueError, match=r"verses of books without a genre: \['Tobit'\]"):
        label_verses([Verse("Tobit", 1, 1, "apocrypha")])


def test_split_by_chapter_keeps_chapters_whole():
    data = label_verses(_verses())
    for seed in range(10):
        train, heldout = split_by_chapter(data, heldout_fraction=0.3, seed=seed)
        assert len(train) + len(heldout) == len(data)
        assert not set(train.groups) & set(heldout.groups)
        assert len(heldout) >= 0.3 * len(data)
        assert sorted(train.texts + heldout.texts) == sorted(data.texts)
    with pytest.raises(ValueError, match=r"`heldout_fraction` must lie in \(0, 1\); got 1.0"):
        split_by_chapter(data, heldout_fraction=1.0, seed=0)


def test_sample_and_fingerprint():
    data = label_verses(_verses())
    part = sample(data, 5, seed=0)
    assert len(part) == 5 and set(part.texts) <= set(data.texts)
    assert sample(data, 5, seed=0).fingerprint == part.fingerprint
    assert sample(data, 5, seed=1).fingerprint != part.fingerprint
    assert sample(data, None, seed=0) is data
    with pytest.raises(ValueError, match=r"`n` must be an integer in \[1, 14\] or None; got 15"):
        sample(data, 15, seed=0)


def test_dataset_checks_its_fields():
    with pytest.raises(ValueError, match=r"must have one entry per text \(2\)"):
        TextDataset("x", ("a", "b"), np.zeros(1, np.int64), np.zeros(2, np.int64), ("", ""),
                    ("c",), "test")  # fmt: skip


@pytest.mark.skipif(
    shutil.which("bible") is None, reason="needs Debian bible-kjv: run scripts/install-text.sh"
)
def test_the_whole_bible_has_the_documented_class_balance():
    data = kjv_genres()
    assert len(data) == 31102
    assert data.class_counts().tolist() == [5852, 8025, 4785, 5894, 3779, 2767]
    assert len(np.unique(data.groups)) == 1189  # chapters
    _, heldout = split_by_chapter(data, heldout_fraction=0.3, seed=0)
    assert 0.3 <= len(heldout) / len(data) < 0.31


def test_missing_bible_names_the_install_script(monkeypatch):
    import exitguard.data.text as text

    monkeypatch.setattr(text.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"scripts/install-text.sh"):
        kjv_genres()
