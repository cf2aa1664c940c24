"""tokenize: spaCy tokens, counts, statistics and the length histogram."""

from __future__ import annotations

import polars as pl
import pytest

from stages.common import StageError
from stages.tokenize import length_histogram, token_stats, tokenize_texts, tokens_table


def test_tokenize_texts_splits_punctuation_and_contractions() -> None:
    (tokens, whitespace), (tokens2, _) = tokenize_texts(
        ["Oil hits $50 a barrel, doesn't it?", "U.S. stocks rise"]
    )
    assert tokens == ["Oil", "hits", "$", "50", "a", "barrel", ",", "does", "n't", "it", "?"]
    assert whitespace == [True, True, False, True, True, False, True, False, True, False, False]
    assert tokens2 == ["U.S.", "stocks", "rise"]


def test_tokens_and_whitespace_give_back_the_text() -> None:
    texts = ["Intel's $2 billion (U.S.) plan - for chips!", "Talks resume in Geneva."]
    for text, (tokens, whitespace) in zip(texts, tokenize_texts(texts), strict=True):
        assert "".join(t + " " * w for t, w in zip(tokens, whitespace, strict=True)) == text


def test_tokens_are_the_same_with_two_processes() -> None:
    texts = [f"Story number {i} about markets, sports and science." for i in range(50)]
    assert tokenize_texts(texts, n_process=2, batch_size=7) == tokenize_texts(texts)


def test_bad_params_are_a_clear_error() -> None:
    with pytest.raises(StageError, match="n_process"):
        tokenize_texts(["x"], n_process=0)


def test_tokens_table_stats_and_histogram() -> None:
    df = pl.DataFrame({"id": ["a", "b", "c"], "split": ["train", "train", "test"]})
    table = tokens_table(
        df, [(["one", "two"], [True, False]), (["one"], [False]), (["three"] * 9, [True] * 9)]
    )
    assert table.columns == ["id", "split", "tokens", "whitespace", "n_tokens"]
    assert table["n_tokens"].to_list() == [2, 1, 9]
    stats = token_stats(table)
    assert stats["rows"] == 3
    assert stats["tokens"] == 12
    assert stats["vocabulary_size"] == 3
    assert stats["n_tokens_max"] == 9
    assert stats["per_split"]["train"]["vocabulary_size"] == 2
    hist = length_histogram(table)
    assert hist.rows() == [("000-007", 2), ("008-015", 1)]
