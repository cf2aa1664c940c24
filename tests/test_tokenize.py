"""tokenize: spaCy tokens, counts, statistics and the length histogram."""

from __future__ import annotations

import polars as pl
import pytest

from stages.common import StageError
from stages.tokenize import length_histogram, token_stats, tokenize_texts, tokens_table


def rows(tokenized: pl.DataFrame) -> list[tuple[list[str], list[bool]]]:
    return list(zip(tokenized["tokens"].to_list(), tokenized["whitespace"].to_list(), strict=True))


def test_tokenize_texts_splits_punctuation_and_contractions() -> None:
    tokenized = tokenize_texts(["Oil hits $50 a barrel, doesn't it?", "U.S. stocks rise"])
    (tokens, whitespace), (tokens2, _) = rows(tokenized)
    assert tokens == ["Oil", "hits", "$", "50", "a", "barrel", ",", "does", "n't", "it", "?"]
    assert whitespace == [True, True, False, True, True, False, True, False, True, False, False]
    assert tokens2 == ["U.S.", "stocks", "rise"]
    assert tokenized["n_tokens"].to_list() == [11, 3]


def test_tokens_are_spacys_and_give_back_the_text() -> None:
    """Tokens cut out by offsets are exactly spaCy's token texts, non-ASCII and odd spacing too."""
    import spacy

    texts = [
        "Intel's $2 billion (U.S.) plan - for chips!",
        "Talks resume in Genève \u2014 «finally»  at 9:30 a.m. \U0001f600 emoji",
        "tab\tand  double  spaces, trailing dot.",
    ]
    nlp = spacy.blank("en")
    for text, doc, (tokens, whitespace) in zip(
        texts, nlp.pipe(texts), rows(tokenize_texts(texts)), strict=True
    ):
        assert tokens == [t.text for t in doc]
        assert whitespace == [bool(t.whitespace_) for t in doc]
        assert "".join(t + " " * w for t, w in zip(tokens, whitespace, strict=True)) == text


def test_tokens_are_the_same_with_two_processes() -> None:
    texts = [f"Story number {i} about markets, sports and science." for i in range(50)]
    assert tokenize_texts(texts, n_process=2, batch_size=7).equals(tokenize_texts(texts))


def test_bad_params_are_a_clear_error() -> None:
    from stages.params import parse_section
    from stages.tokenize import TokenizeParams

    with pytest.raises(StageError, match=r"tokenize\.n_process=0 \(must be >= 1\)"):
        parse_section({"n_process": 0, "batch_size": 10}, TokenizeParams, "tokenize")
    with pytest.raises(StageError, match=r"tokenize\.batch_size=0 \(must be >= 1\)"):
        parse_section({"n_process": 1, "batch_size": 0}, TokenizeParams, "tokenize")


def test_tokens_table_stats_and_histogram() -> None:
    df = pl.DataFrame({"id": ["a", "b", "c"], "split": ["train", "train", "test"]})
    table = tokens_table(df, tokenize_texts(["one two", "one", " ".join(["three"] * 9)]))
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


def test_streamed_table_depends_on_rows_not_on_chunking(tmp_path) -> None:
    import pyarrow.parquet as pq

    from stages.tokenize import write_table_stream

    texts = [f"Story {i}: markets, sports {i % 7} and science." for i in range(250)]
    table = tokens_table(
        pl.DataFrame({"id": [str(i) for i in range(250)], "split": "train"}), tokenize_texts(texts)
    )
    files = []
    for sizes in ((250,), (1, 99, 150), (64, 64, 64, 58)):
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        frames = [table.slice(start, size) for start, size in zip(starts, sizes, strict=True)]
        path = tmp_path / f"tokens_{len(sizes)}.parquet"
        assert write_table_stream(frames, path, row_group_rows=100) == 250
        files.append(path.read_bytes())
    assert files[0] == files[1] == files[2]
    parquet = pq.ParquetFile(tmp_path / "tokens_1.parquet")
    assert [parquet.metadata.row_group(i).num_rows for i in range(3)] == [100, 100, 50]
    assert pl.read_parquet(tmp_path / "tokens_1.parquet").equals(table)


def test_two_processes_stream_the_same_tables() -> None:
    from stages.tokenize import tokenize_stream

    rows = pl.DataFrame(
        {
            "id": [str(i) for i in range(40)],
            "split": "test",
            "text": [f"Text {i}, ok." for i in range(40)],
        }
    )
    chunks = [rows.slice(i, 6) for i in range(0, 40, 6)]
    one = pl.concat(tokenize_stream(chunks, n_process=1, batch_size=6))
    two = pl.concat(tokenize_stream(chunks, n_process=2, batch_size=6))
    assert one.equals(two) and one["id"].to_list() == rows["id"].to_list()
