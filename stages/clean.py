"""clean: normalise text and drop rows that would mislead training, with Polars expressions only.

Text rules, in order (each a function `pl.Expr -> pl.Expr` that does one thing):
  decode_entities      `#36;` -> `$`, `#39;` -> `'`, `&lt;b&gt;` -> `<b>`, `&amp;` -> `&` ...
  strip_html_tags      the tags those entities spelled (`<b>`, `<A HREF=...>`), not `<TXN.N>` tickers
  backslash_breaks     the backslashes that stand for line breaks in the original release
  urls                 param `clean.urls`: remove | keep | token (the word "URL")
  collapse_whitespace  runs of whitespace -> one space, trimmed
Row rules, in order, on train rows only (test rows are never removed, so scores stay comparable with
the official 7,600-row test split); each returns rows kept and rows removed, tagged with the rule:
  too_short / too_long   params `clean.min_chars`, `clean.max_chars` on the cleaned text
  exact_duplicate        same split, text and label as an earlier row
  normalised_duplicate   same split, label and normalised text (case, punctuation, spacing)
  test_leakage           a train row whose normalised text occurs in test
and one flag: `label_conflict`, set on rows whose normalised text occurs in the same split with
another label (kept: label_issues decides what to do with them).
"""

from __future__ import annotations

import html
from collections.abc import Callable

import polars as pl

from stages import paths
from stages.common import (
    SPLITS,
    check_contract,
    get_logger,
    load_labels,
    read_table,
    run_main,
    write_json,
    write_table,
)
from stages.params import load_section
from stages.sections import CleanParams

log = get_logger("clean")


URL_PATTERN = r"(?i)\b(?:https?://|www\.)\S+"
# Only real HTML tag names: `<TXN.N>` and `<IBM>`-style ticker symbols stay as they are.
HTML_TAG_PATTERN = r"(?i)</?(?:a|b|i|u|p|br|em|strong|font|img|span|div|sup|sub)(?:\s[^<>]*)?/?>"
BACKSLASH_PATTERN = r"\\+"
# Runs of two or more whitespace characters, or one that is not a plain space: replacing every
# single space with itself would cost five times as much for the same result as `\s+`.
WHITESPACE_PATTERN = r"\s\s+|[^\S ]"
# Characters whose HTML numeric references appear in news feeds beyond Latin-1.
EXTRA_CODE_POINTS = (8211, 8212, 8216, 8217, 8220, 8221, 8226, 8230, 8364, 8482)
NAMED_ENTITIES = {"&lt;": "<", "&gt;": ">", "&amp;": "&", "&quot;": '"', "&apos;": "'"}


def _entity_table() -> dict[str, str]:
    """Every entity spelling the feeds use, mapped to its character.

    AG News writes numeric references without the ampersand (`#36;`), sometimes zero-padded
    (`#038;`), and the 128-159 range means Windows-1252 (`#151;` is an em dash).
    """
    table = {**NAMED_ENTITIES, "&nbsp;": " "}
    for code in (*range(32, 256), *EXTRA_CODE_POINTS):
        if 128 <= code < 160:
            try:
                char = bytes([code]).decode("cp1252")
            except UnicodeDecodeError:
                continue
        else:
            char = html.unescape(f"&#{code};")
        for digits in {str(code), f"{code:03d}"}:
            table[f"&#{digits};"] = char
            table[f"#{digits};"] = char
    # Feeds sometimes escape twice (`&amp;lt;`): spell those out so that one pass decodes all.
    table.update({f"&amp;{e[1:]}": c for e, c in table.items() if e.startswith("&")})
    # Longest spelling first: with leftmost matching, `&amp;lt;` then wins over `&amp;`.
    return dict(sorted(table.items(), key=lambda item: -len(item[0])))


ENTITY_TABLE = _entity_table()


def decode_entities(text: pl.Expr) -> pl.Expr:
    return text.str.replace_many(list(ENTITY_TABLE), list(ENTITY_TABLE.values()), leftmost=True)


def strip_html_tags(text: pl.Expr) -> pl.Expr:
    return text.str.replace_all(HTML_TAG_PATTERN, " ")


def backslash_breaks(text: pl.Expr) -> pl.Expr:
    return text.str.replace_all(BACKSLASH_PATTERN, " ")


def replace_urls(text: pl.Expr, mode: str) -> pl.Expr:
    if mode == "keep":
        return text
    return text.str.replace_all(URL_PATTERN, " URL " if mode == "token" else " ")


def collapse_whitespace(text: pl.Expr) -> pl.Expr:
    return text.str.replace_all(WHITESPACE_PATTERN, " ").str.strip_chars()


def text_rules(urls: str) -> list[tuple[str, Callable[[pl.Expr], pl.Expr]]]:
    """The text rules in the order they apply, for a `clean.urls` mode."""
    return [
        ("decode_entities", decode_entities),
        ("strip_html_tags", strip_html_tags),
        ("backslash_breaks", backslash_breaks),
        ("urls", lambda text: replace_urls(text, urls)),
        ("collapse_whitespace", collapse_whitespace),
    ]


def apply_text_rules(df: pl.DataFrame, urls: str) -> tuple[pl.DataFrame, dict[str, int]]:
    """`df` with `text` cleaned, and how many rows each rule changed."""
    lazy = df.lazy().with_columns(pl.col("text").alias("_step0"))
    names = []
    for i, (name, rule) in enumerate(text_rules(urls), start=1):
        lazy = lazy.with_columns(rule(pl.col(f"_step{i - 1}")).alias(f"_step{i}"))
        names.append(name)
    steps = [f"_step{i}" for i in range(len(names) + 1)]
    touched = [
        (pl.col(b) != pl.col(a)).sum().alias(n)
        for n, a, b in zip(names, steps[:-1], steps[1:], strict=True)
    ]
    out = lazy.with_columns(pl.col(steps[-1]).alias("text")).collect()
    counts = out.select(touched).row(0, named=True)
    return out.drop(steps), counts


def normalised_key(text: pl.Expr) -> pl.Expr:
    """Text as duplicates are compared: lowercase letters and digits, single-spaced."""
    return text.str.to_lowercase().str.replace_all(r"[^\p{L}\p{N}]+", " ").str.strip_chars()


def _removed(df: pl.DataFrame, rule: str, detail: pl.Expr) -> pl.DataFrame:
    return df.with_columns(pl.lit(rule).alias("rule"), detail.cast(pl.String).alias("detail"))


def length_bounds(
    df: pl.DataFrame, min_chars: int, max_chars: int
) -> tuple[pl.DataFrame, pl.DataFrame]:
    length = pl.col("text").str.len_chars()
    short = df.filter(length < min_chars)
    long = df.filter(length > max_chars)
    removed = pl.concat(
        [
            _removed(short, "too_short", pl.format("{} chars < {}", length, pl.lit(min_chars))),
            _removed(long, "too_long", pl.format("{} chars > {}", length, pl.lit(max_chars))),
        ]
    )
    return df.filter(length.is_between(min_chars, max_chars)), removed


def drop_duplicates(df: pl.DataFrame, key: pl.Expr, rule: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Keep the first row (input order) of each (split, label, key) group; remove the rest."""
    marked = df.with_columns(key.alias("_key")).with_columns(
        pl.col("id").first().over("split", "label", "_key").alias("_first")
    )
    is_first = pl.col("id") == pl.col("_first")
    kept = marked.filter(is_first).drop("_key", "_first")
    removed = _removed(
        marked.filter(~is_first), rule, pl.format("duplicate of {}", pl.col("_first"))
    )
    return kept, removed.drop("_key", "_first")


def drop_test_leakage(train: pl.DataFrame, test: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Remove train rows whose normalised text also occurs in test (named in `detail`)."""
    test_keys = test.select(
        normalised_key(pl.col("text")).alias("_key"), pl.col("id").alias("_test_id")
    )
    marked = train.with_columns(normalised_key(pl.col("text")).alias("_key")).join(
        test_keys.unique("_key", keep="first", maintain_order=True),
        on="_key",
        how="left",
        maintain_order="left",
    )
    leaked = pl.col("_test_id").is_not_null()
    removed = _removed(
        marked.filter(leaked),
        "test_leakage",
        pl.format("text occurs in test as {}", pl.col("_test_id")),
    )
    return marked.filter(~leaked).drop("_key", "_test_id"), removed.drop("_key", "_test_id")


def flag_label_conflicts(df: pl.DataFrame) -> pl.DataFrame:
    """`label_conflict`: the same normalised text carries more than one label within a split."""
    key = normalised_key(pl.col("text"))
    return df.with_columns(
        (pl.col("label").n_unique().over("split", key) > 1).alias("label_conflict")
    )


def clean(
    df: pl.DataFrame, urls: str, min_chars: int, max_chars: int
) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """Apply every rule: (clean rows, removed rows with their rule, report).

    Text rules apply to both splits (the model must see test text cleaned the same way); row rules
    remove train rows only, so that every run is scored on the complete official test split.
    """
    cleaned, touched = apply_text_rules(df, urls)
    train = cleaned.filter(pl.col("split") == "train")
    test = cleaned.filter(pl.col("split") == "test")
    removed_parts = []
    train, removed = length_bounds(train, min_chars, max_chars)
    removed_parts.append(removed)
    for key, rule in (
        (pl.col("text"), "exact_duplicate"),
        (normalised_key(pl.col("text")), "normalised_duplicate"),
    ):
        train, removed = drop_duplicates(train, key, rule)
        removed_parts.append(removed)
    train, removed = drop_test_leakage(train, test)
    removed_parts.append(removed)
    kept = flag_label_conflicts(pl.concat([train, test]))
    removed_all = pl.concat(removed_parts)
    if kept.height + removed_all.height != df.height:
        raise AssertionError("clean lost rows: rows in != kept + removed")
    rules = ("too_short", "too_long", "exact_duplicate", "normalised_duplicate", "test_leakage")
    report = {
        "rows_in": df.height,
        "rows_out": kept.height,
        "rows_removed": removed_all.height,
        "text_rules_rows_changed": touched,
        "removed_by_rule": {r: removed_all.filter(pl.col("rule") == r).height for r in rules},
        "label_conflict_rows_flagged": int(kept["label_conflict"].sum()),
        "per_split": {
            s: {
                "rows_in": df.filter(pl.col("split") == s).height,
                "rows_out": kept.filter(pl.col("split") == s).height,
            }
            for s in SPLITS
        },
    }
    return kept, removed_all, report


def main() -> None:
    params = load_section("clean", CleanParams)
    log.info("params %s", params)
    df = read_table(paths.INGESTED)
    check_contract(df, paths.INGESTED, load_labels())
    kept, removed, report = clean(df, params.urls, params.min_chars, params.max_chars)
    for rule, count in report["removed_by_rule"].items():
        log.info("%-21s removed %5d rows", rule, count)
    log.info(
        "%d rows in, %d out; %d flagged label_conflict",
        df.height,
        kept.height,
        report["label_conflict_rows_flagged"],
    )
    write_table(kept, paths.CLEAN)
    write_table(removed, paths.REMOVED)
    write_json(report, paths.CLEAN_REPORT)


if __name__ == "__main__":
    run_main(main, "clean")
