"""tokenize: spaCy tokens of every clean row, for augmentation and for the data report.

Uses the rule-based English tokenizer of `spacy.blank("en")` (no statistical model is needed or
downloaded). Texts go through it in chunks of `batch_size`; with `n_process` > 1 the chunks are
spread over worker processes. A worker sends back a small Polars table per chunk, built from each
Doc's offset arrays (`Doc.to_array`), never the Doc objects: pickling Docs between processes made 2
processes 3.5x slower than one (reports/bench_data.json). Chunks come back in order, so the output is
the same for any number of workers. Run as `python -m stages.tokenize`: run as a script, this file
would shadow the standard library's `tokenize` module.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import polars as pl
import pyarrow as pa
import spacy
from spacy.attrs import IDX, LENGTH, SPACY
from tqdm import tqdm

from stages.common import (
    StageError,
    get_logger,
    load_params,
    read_table,
    run_main,
    write_csv,
    write_json,
    write_table,
)

log = get_logger("tokenize")

PERCENTILES = (50, 90, 95, 99)
HISTOGRAM_BIN = 8
TOKEN_COLUMNS = ("tokens", "whitespace", "n_tokens")

_nlp: spacy.language.Language | None = None


def _tokenizer() -> spacy.language.Language:
    """One blank English pipeline per process (workers build their own)."""
    global _nlp
    if _nlp is None:
        _nlp = spacy.blank("en")
    return _nlp


def tokenize_chunk(texts: list[str]) -> pl.DataFrame:
    """Tokens of `texts`, whether a space follows each, and their count, one row per text.

    Token strings are cut out of the texts by the offsets spaCy reports (character start and length),
    in Polars, instead of one Python string per token: `tokens` equals `[t.text for t in doc]` and
    `whitespace` `[bool(t.whitespace_) for t in doc]`, so that augment can rebuild a text as
    `"".join(t + " " * w for t, w in zip(tokens, whitespace))`.
    """
    arrays = [doc.to_array([IDX, LENGTH, SPACY]) for doc in _tokenizer().pipe(texts)]
    counts = np.array([len(a) for a in arrays], dtype=np.int64)
    flat = np.concatenate(arrays) if arrays else np.zeros((0, 3), dtype=np.uint64)
    flat = flat.reshape(-1, 3).astype(np.int64)
    owner = pl.Series(texts, dtype=pl.String).gather(np.repeat(np.arange(len(texts)), counts))
    pieces = owner.str.slice(pl.Series(flat[:, 0]), pl.Series(flat[:, 1]))
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]), type=pa.int64())

    def lists(values: pa.Array) -> pl.Series:
        return pl.Series(pa.LargeListArray.from_arrays(offsets, values))

    return pl.DataFrame(
        {
            "tokens": lists(pieces.to_arrow()),
            "whitespace": lists(pa.array(flat[:, 2].astype(bool))),
            "n_tokens": pl.Series(counts),
        }
    ).cast({"tokens": pl.List(pl.String), "whitespace": pl.List(pl.Boolean)})


def _chunks(texts: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(texts), size):
        yield texts[start : start + size]


def tokenize_texts(texts: list[str], n_process: int = 1, batch_size: int = 1000) -> pl.DataFrame:
    """`tokenize_chunk` over `texts` in chunks of `batch_size`, on `n_process` processes, in order."""
    if n_process < 1 or batch_size < 1:
        raise StageError(
            f"params.yaml tokenize: n_process ({n_process}) and batch_size ({batch_size}) must be >= 1"
        )
    bar = tqdm(total=len(texts), desc="tokenize", unit="row", mininterval=1)
    frames = []
    with bar:
        if n_process == 1:
            for chunk in _chunks(texts, batch_size):
                frames.append(tokenize_chunk(chunk))
                bar.update(len(chunk))
        else:
            # spawn, not fork: a forked child of a process that has started Polars' thread pool can
            # deadlock. `map` keeps the chunks' order whatever worker finishes first.
            with ProcessPoolExecutor(n_process, mp_context=get_context("spawn")) as pool:
                for frame in pool.map(tokenize_chunk, _chunks(texts, batch_size)):
                    frames.append(frame)
                    bar.update(frame.height)
    if not frames:
        return pl.DataFrame(
            schema={
                "tokens": pl.List(pl.String),
                "whitespace": pl.List(pl.Boolean),
                "n_tokens": pl.Int64,
            }
        )
    return pl.concat(frames).rechunk()


def tokens_table(df: pl.DataFrame, tokenized: pl.DataFrame) -> pl.DataFrame:
    """The tokens table: id, split, tokens, whitespace, n_tokens, in the row order of `df`."""
    return pl.concat([df.select("id", "split"), tokenized.select(TOKEN_COLUMNS)], how="horizontal")


def token_stats(table: pl.DataFrame) -> dict:
    """Vocabulary size and token-count percentiles, overall and per split."""

    def stats(part: pl.DataFrame) -> dict:
        n = part["n_tokens"]
        return {
            "rows": part.height,
            "tokens": int(n.sum()),
            "vocabulary_size": part["tokens"].explode().n_unique(),
            "n_tokens_mean": round(float(n.mean()), 2),
            **{f"n_tokens_p{p}": int(n.quantile(p / 100, "nearest")) for p in PERCENTILES},
            "n_tokens_max": int(n.max()),
        }

    splits = {s: stats(part) for (s,), part in table.group_by("split", maintain_order=True)}
    return {**stats(table), "per_split": splits}


def length_histogram(table: pl.DataFrame) -> pl.DataFrame:
    """Rows per token-count bin ("024-031"), zero-padded so that plots sort the bins in order."""
    start = (pl.col("n_tokens") // HISTOGRAM_BIN) * HISTOGRAM_BIN
    label = pl.format(
        "{}-{}",
        start.cast(pl.String).str.zfill(3),
        (start + HISTOGRAM_BIN - 1).cast(pl.String).str.zfill(3),
    )
    return table.group_by(label.alias("n_tokens")).len("rows").sort("n_tokens")


def main() -> None:
    params = load_params("tokenize")
    df = read_table("data/interim/clean.parquet", columns=["id", "split", "text"])
    tokens = tokenize_texts(df["text"].to_list(), params["n_process"], params["batch_size"])
    table = tokens_table(df, tokens)
    stats = token_stats(table)
    log.info(
        "%d rows, %d tokens, vocabulary %d, p95 %d tokens",
        stats["rows"],
        stats["tokens"],
        stats["vocabulary_size"],
        stats["n_tokens_p95"],
    )
    write_table(table, "data/interim/tokens.parquet")
    write_json(stats, "reports/tokens.json")
    write_csv(length_histogram(table), "reports/plots/token_lengths.csv")


if __name__ == "__main__":
    run_main(main, "tokenize")
