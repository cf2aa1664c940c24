"""clean: each rule on its own, then the whole stage's bookkeeping."""

from __future__ import annotations

import polars as pl
import pytest

from stages.clean import (
    apply_text_rules,
    backslash_breaks,
    clean,
    collapse_whitespace,
    decode_entities,
    drop_duplicates,
    drop_test_leakage,
    flag_label_conflicts,
    length_bounds,
    normalised_key,
    replace_urls,
    strip_html_tags,
)
from stages.common import StageError


def run(rule, text: str) -> str:
    return pl.select(rule(pl.lit(text)))[0, 0]


def rows(*specs: tuple[str, str, int, str]) -> pl.DataFrame:
    return pl.DataFrame(
        [dict(zip(("id", "split", "label", "text"), s, strict=True)) for s in specs],
        schema={"id": pl.String, "split": pl.String, "label": pl.Int64, "text": pl.String},
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("costs #36;10 million", "costs $10 million"),
        ("the company#39;s plan", "the company's plan"),
        ("AT#38;T and AT#038;T", "AT&T and AT&T"),
        ("&lt;b&gt;Bold&lt;/b&gt;", "<b>Bold</b>"),
        ("Q&amp;A", "Q&A"),
        ("a &#39;quoted&#39; word", "a 'quoted' word"),
        ("double &amp;lt;escaped&amp;gt;", "double <escaped>"),
        ("dash #151; here", "dash \u2014 here"),
        ("em #8212; dash", "em \u2014 dash"),
        ("no entity #1 here", "no entity #1 here"),
    ],
)
def test_decode_entities(raw: str, expected: str) -> None:
    assert run(decode_entities, raw) == expected


def test_strip_html_tags_keeps_ticker_symbols() -> None:
    raw = 'Staples Inc. <A HREF="http://x.com/q?t=SPLS.O">SPLS.O</A>, and Texas Instruments <TXN.N>'
    assert run(strip_html_tags, raw) == "Staples Inc.  SPLS.O , and Texas Instruments <TXN.N>"
    assert run(strip_html_tags, "<b>Bold</b> <br/> text") == " Bold    text"


def test_backslash_breaks() -> None:
    assert run(backslash_breaks, "second\\team and \\\\quoted") == "second team and  quoted"


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("remove", "see   for more"),
        ("token", "see  URL  for more"),
        ("keep", "see http://www.example.com/a?b=1 for more"),
    ],
)
def test_replace_urls(mode: str, expected: str) -> None:
    assert (
        run(lambda t: replace_urls(t, mode), "see http://www.example.com/a?b=1 for more")
        == expected
    )


def test_collapse_whitespace() -> None:
    assert run(collapse_whitespace, "  many   spaces\tand\nbreaks  ") == "many spaces and breaks"


def test_apply_text_rules_counts_rows_each_rule_changed() -> None:
    df = rows(
        ("1", "train", 0, "Price #36;5"),
        ("2", "train", 0, "two  spaces"),
        ("3", "train", 0, "already clean"),
    )
    out, touched = apply_text_rules(df, urls="remove")
    assert out["text"].to_list() == ["Price $5", "two spaces", "already clean"]
    assert touched == {
        "decode_entities": 1,
        "strip_html_tags": 0,
        "backslash_breaks": 0,
        "urls": 0,
        "collapse_whitespace": 1,
    }
    assert out.columns == df.columns


def test_bad_params_are_clear_errors() -> None:
    from stages.clean import CleanParams
    from stages.params import parse_section

    good = {"urls": "remove", "min_chars": 20, "max_chars": 1500}
    with pytest.raises(StageError, match="clean.urls: 'drop'; choose from"):
        parse_section(good | {"urls": "drop"}, CleanParams, "clean")
    with pytest.raises(StageError, match=r"clean\.max_chars=5 \(must be >= clean\.min_chars\)"):
        parse_section(good | {"min_chars": 10, "max_chars": 5}, CleanParams, "clean")
    with pytest.raises(StageError, match=r"clean\.min_chars=-1"):
        parse_section(good | {"min_chars": -1}, CleanParams, "clean")


def test_length_bounds_removes_with_rule_and_detail() -> None:
    df = rows(
        ("1", "train", 0, "short"), ("2", "train", 0, "just right"), ("3", "train", 0, "x" * 30)
    )
    kept, removed = length_bounds(df, min_chars=6, max_chars=20)
    assert kept["id"].to_list() == ["2"]
    assert removed.select("id", "rule", "detail").rows() == [
        ("1", "too_short", "5 chars < 6"),
        ("3", "too_long", "30 chars > 20"),
    ]


def test_exact_duplicates_keep_the_first_row_per_label() -> None:
    df = rows(
        ("a", "train", 1, "same text"),
        ("b", "train", 1, "same text"),
        ("c", "train", 2, "same text"),  # other label: a conflict, not a duplicate
        ("d", "train", 1, "Same text"),  # differs in case: not an exact duplicate
    )
    kept, removed = drop_duplicates(df, pl.col("text"), "exact_duplicate")
    assert kept["id"].to_list() == ["a", "c", "d"]
    assert removed.select("id", "rule", "detail").rows() == [
        ("b", "exact_duplicate", "duplicate of a")
    ]


def test_normalised_duplicates_ignore_case_punctuation_and_spacing() -> None:
    df = rows(("a", "train", 0, "Oil hits $50, again"), ("b", "train", 0, "oil hits 50 again!"))
    kept, removed = drop_duplicates(df, normalised_key(pl.col("text")), "normalised_duplicate")
    assert kept["id"].to_list() == ["a"]
    assert removed["detail"].to_list() == ["duplicate of a"]


def test_test_leakage_removes_train_rows_seen_in_test() -> None:
    train = rows(("t1", "train", 0, "Leaked headline, here"), ("t2", "train", 0, "private row"))
    test = rows(("x1", "test", 0, "leaked HEADLINE here"))
    kept, removed = drop_test_leakage(train, test)
    assert kept["id"].to_list() == ["t2"]
    assert removed.select("id", "rule", "detail").rows() == [
        ("t1", "test_leakage", "text occurs in test as x1")
    ]


def test_label_conflicts_are_flagged_within_a_split_only() -> None:
    df = rows(
        ("a", "train", 0, "Same story"),
        ("b", "train", 2, "same story!"),
        ("c", "test", 1, "same story"),
        ("d", "train", 3, "unrelated"),
    )
    assert flag_label_conflicts(df)["label_conflict"].to_list() == [True, True, False, False]


def test_clean_never_removes_test_rows_and_accounts_for_every_row() -> None:
    df = rows(
        ("1", "train", 0, "A  story #36;1 long enough"),
        ("2", "train", 0, "A story $1 long enough"),
        ("3", "train", 1, "tiny"),
        ("4", "train", 2, "Shared with test, long"),
        ("5", "test", 2, "shared with test long"),
        ("6", "test", 3, "tiny"),
        ("7", "test", 3, "tiny"),
    ).with_columns(pl.lit("s").alias("source"), pl.lit(1).alias("row"))
    kept, removed, report = clean(df, urls="remove", min_chars=10, max_chars=100)
    assert sorted(kept["id"]) == ["1", "5", "6", "7"]
    assert removed.select("id", "rule").rows() == [
        ("3", "too_short"),
        ("2", "exact_duplicate"),
        ("4", "test_leakage"),
    ]
    assert report["rows_in"] == report["rows_out"] + report["rows_removed"] == 7
    assert report["per_split"]["test"] == {"rows_in": 3, "rows_out": 3}
    assert "label_conflict" in kept.columns
