"""Benchmark of the data stages: `python -m bench.bench_data` (after `dvc repro tokenize`).

clean: the stage's Polars text rules against the same rules written as a pandas row-wise function
(`df["text"].apply(...)` with `re`), checked to give identical text on the same rows in the same run,
at the real 13.6k rows and at 127.6k and 1M rows resampled from them; a classic seed-style
`clean_text` (regex, lowercase, stop words) is timed as a reference row.
tokenize: spaCy tokens/s at n_process 1 and 2.
Prints a table and writes reports/bench_data.json. Timings are the best of `--repeats` runs; the
machine is shared, so compare the ratios measured in one run rather than absolute times.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import time
from collections.abc import Callable

import polars as pl
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from stages.clean import (
    BACKSLASH_PATTERN,
    ENTITY_TABLE,
    HTML_TAG_PATTERN,
    URL_PATTERN,
    WHITESPACE_PATTERN,
    apply_text_rules,
)
from stages.common import read_table, write_json
from stages.tokenize import tokenize_texts

SIZES = (13_600, 127_600, 1_000_000)
URLS = "remove"


def pandas_rules() -> Callable[[str], str]:
    """The clean stage's text rules as one Python function of a string, with `re`."""
    # ENTITY_TABLE lists longest spellings first, so alternation picks what replace_many picks.
    entity_re = re.compile("|".join(re.escape(e) for e in ENTITY_TABLE))
    tag_re, backslash_re = re.compile(HTML_TAG_PATTERN), re.compile(BACKSLASH_PATTERN)
    url_re, space_re = re.compile(URL_PATTERN), re.compile(WHITESPACE_PATTERN)

    def rules(text: str) -> str:
        text = entity_re.sub(lambda m: ENTITY_TABLE[m.group(0)], text)
        text = tag_re.sub(" ", text)
        text = backslash_re.sub(" ", text)
        text = url_re.sub(" ", text)
        return space_re.sub(" ", text).strip()

    return rules


def seed_style_clean_text() -> Callable[[str], str]:
    """The `clean_text` of a typical seed project: lowercase, letters only, no stop words."""
    non_letters = re.compile(r"[^a-z\s]")
    stop_words = frozenset(ENGLISH_STOP_WORDS)

    def clean_text(text: str) -> str:
        text = non_letters.sub(" ", text.lower())
        return " ".join(w for w in text.split() if w not in stop_words)

    return clean_text


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def bench_clean(texts: pl.DataFrame, repeats: int) -> list[dict]:
    rules, seed_style = pandas_rules(), seed_style_clean_text()
    rows = []
    for size in SIZES:
        df = texts if size <= texts.height else texts.sample(size, with_replacement=True, seed=0)
        pdf = df.to_pandas()
        # pandas at 1M rows takes minutes: one run is enough to see the ratio.
        slow_repeats = repeats if size < 1_000_000 else 1
        t_polars, (cleaned, _) = best_time(lambda df=df: apply_text_rules(df, URLS), repeats)
        t_pandas, pandas_out = best_time(lambda pdf=pdf: pdf["text"].apply(rules), slow_repeats)
        t_seed, _ = best_time(lambda pdf=pdf: pdf["text"].apply(seed_style), slow_repeats)
        identical = cleaned["text"].to_list() == pandas_out.tolist()
        if not identical:
            raise AssertionError(f"Polars and pandas rules disagree at {size} rows")
        rows.append(
            {
                "rows": df.height,
                "polars_rules_s": round(t_polars, 3),
                "pandas_rules_s": round(t_pandas, 3),
                "seed_style_clean_text_s": round(t_seed, 3),
                "speedup_vs_pandas_rules": round(t_pandas / t_polars, 1),
                "speedup_vs_seed_style": round(t_seed / t_polars, 1),
                "identical_text": identical,
            }
        )
        print(
            f"clean {df.height:>9,} rows | polars {t_polars:7.3f} s | pandas same rules "
            f"{t_pandas:7.3f} s ({t_pandas / t_polars:5.1f}x) | seed-style clean_text "
            f"{t_seed:7.3f} s | identical: {identical}",
            flush=True,
        )
    return rows


def bench_tokenize(texts: list[str], repeats: int) -> list[dict]:
    rows = []
    n_tokens = tokenize_texts(texts[:2000])["n_tokens"].sum()  # warm-up, and a sanity check
    assert n_tokens > 0
    for n_process in (1, 2):
        seconds, tokens = best_time(lambda n=n_process: tokenize_texts(texts, n_process=n), repeats)
        total = int(tokens["n_tokens"].sum())
        rows.append(
            {
                "n_process": n_process,
                "rows": len(texts),
                "tokens": total,
                "seconds": round(seconds, 3),
                "tokens_per_s": round(total / seconds),
                "tokens_per_s_per_process": round(total / seconds / n_process),
            }
        )
        print(
            f"tokenize n_process={n_process} | {total:,} tokens in {seconds:.2f} s | "
            f"{total / seconds:,.0f} tokens/s ({total / seconds / n_process:,.0f} per process)",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    raw = read_table("data/interim/ingested.parquet", columns=["text"])
    clean_texts = read_table("data/interim/clean.parquet", columns=["text"])["text"].to_list()
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "polars": pl.__version__,
        },
        "load_average_at_start": list(os.getloadavg()),
        "clean": bench_clean(raw, args.repeats),
        "tokenize": bench_tokenize(clean_texts, args.repeats),
        "load_average_at_end": list(os.getloadavg()),
    }
    write_json(report, "reports/bench_data.json")
    print("wrote reports/bench_data.json")


if __name__ == "__main__":
    main()
