"""tokenize: spaCy tokens of every clean row, for augmentation and for the data report.

Uses the rule-based English tokenizer of `spacy.blank("en")` (no statistical model is needed or
downloaded). Texts go through it in chunks of `batch_size`; with `n_process` > 1 the chunks are
spread over worker processes. A worker sends back a small Polars table per chunk, built from each
Doc's offset arrays (`Doc.to_array`), never the Doc objects: pickling Docs between processes made 2
processes 3.5x slower than one; now 2 are 1.86x faster at 1.2M rows (reports/bench_scale.json).
Chunks come back in order, so the output is the same for any number of workers. The stage streams: `clean.parquet` is read, tokenized and
written a chunk at a time (a few chunks in flight), `tokens.parquet` a row group of
`STREAM_ROW_GROUP_ROWS` rows at a time, and the statistics keep only each row's split and token
count and each split's vocabulary, so memory does not grow with the corpus (bench/bench_scale.py).
Run as `python -m stages.tokenize`: run as a script, this file would shadow the standard library's
`tokenize` module.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import spacy
from spacy.attrs import IDX, LENGTH, SPACY
from tqdm import tqdm

from stages import paths
from stages.common import (
    StageError,
    get_logger,
    require_file,
    run_main,
    write_csv,
    write_json,
)
from stages.params import load_section
from stages.sections import TokenizeParams

log = get_logger("tokenize")

PERCENTILES = (50, 90, 95, 99)
HISTOGRAM_BIN = 8
TOKEN_COLUMNS = ("tokens", "whitespace", "n_tokens")

_nlp: spacy.language.Language | None = None


# Rows per Parquet row group when a table is written as a stream: a table of up to this many rows is
# one row group; a larger one is written and read a row group at a time, in bounded memory.
STREAM_ROW_GROUP_ROWS = 65_536


def write_table_stream(
    frames: Iterable[pl.DataFrame], path: str | Path, row_group_rows: int = STREAM_ROW_GROUP_ROWS
) -> int:
    """Write frames (one schema) as one Parquet file, a row group of `row_group_rows` at a time.

    Row groups are cut at fixed row counts whatever the frames' sizes, so the file depends only on
    the rows: the same bytes from any chunking (zstd level 3, as `write_table`). Returns the rows.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer: pq.ParquetWriter | None = None
    pending: list[pa.Table] = []
    buffered = rows = 0

    def flush(n: int) -> None:
        nonlocal pending, buffered
        table = pa.concat_tables(pending)
        writer.write_table(table.slice(0, n), row_group_size=row_group_rows)
        pending, buffered = [table.slice(n)], table.num_rows - n

    for frame in frames:
        # Oldest compat level: plain large_string/large_list columns, which every reader knows.
        table = frame.to_arrow(compat_level=pl.CompatLevel.oldest())
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema, compression="zstd", compression_level=3)
        pending.append(table)
        buffered += table.num_rows
        rows += table.num_rows
        while buffered >= row_group_rows:
            flush(row_group_rows)
    if writer is None:
        raise StageError(f"{path}: nothing to write")
    if buffered:
        flush(buffered)
    writer.close()
    return rows


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


def tokens_table(df: pl.DataFrame, tokenized: pl.DataFrame) -> pl.DataFrame:
    """The tokens table: id, split, tokens, whitespace, n_tokens, in the row order of `df`."""
    return pl.concat([df.select("id", "split"), tokenized.select(TOKEN_COLUMNS)], how="horizontal")


def tokenize_rows(rows: pl.DataFrame) -> pl.DataFrame:
    """The tokens table of some rows (id, split, text)."""
    return tokens_table(rows, tokenize_chunk(rows["text"].to_list()))


def tokenize_stream(
    chunks: Iterable[pl.DataFrame], n_process: int, batch_size: int
) -> Iterator[pl.DataFrame]:
    """`tokenize_rows` of each chunk, in order, on `n_process` processes, a few chunks in flight."""
    if n_process == 1:
        yield from map(tokenize_rows, chunks)
        return
    # spawn, not fork: a forked child of a process that has started Polars' thread pool can
    # deadlock. Results are taken in submission order, whichever worker finishes first.
    with ProcessPoolExecutor(n_process, mp_context=get_context("spawn")) as pool:
        in_flight: deque = deque()
        for chunk in chunks:
            in_flight.append(pool.submit(tokenize_rows, chunk))
            if len(in_flight) >= 2 * n_process:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()


def tokenize_texts(texts: list[str], n_process: int = 1, batch_size: int = 1000) -> pl.DataFrame:
    """tokens, whitespace and n_tokens of each text, in order (`tokenize_stream` over a list)."""
    rows = pl.DataFrame({"id": list(range(len(texts))), "text": texts}, strict=False)
    rows = rows.with_columns(pl.lit("").alias("split"))
    chunks = (rows.slice(start, batch_size) for start in range(0, len(texts), batch_size))
    tables = list(tokenize_stream(chunks, n_process, batch_size))
    if not tables:
        return tokenize_chunk([])
    return pl.concat(tables).select(TOKEN_COLUMNS)


class TokenStats:
    """What the report needs of the tokens table, kept small: each row's split and token count, and
    each split's vocabulary (deduplicated as it grows)."""

    def __init__(self) -> None:
        self.lengths: list[pl.DataFrame] = []
        self.vocab = pl.DataFrame(schema={"split": pl.String, "tokens": pl.String})
        self.new_words: list[pl.DataFrame] = []

    def add(self, table: pl.DataFrame) -> pl.DataFrame:
        self.lengths.append(table.select("split", "n_tokens"))
        self.new_words.append(table.select("split", "tokens").explode("tokens").unique())
        if sum(words.height for words in self.new_words) > max(self.vocab.height, 1 << 18):
            self._compact()
        return table

    def _compact(self) -> None:
        self.vocab = pl.concat([self.vocab, *self.new_words]).unique()
        self.new_words = []

    def report(self) -> tuple[dict, pl.DataFrame]:
        """Vocabulary size and token-count percentiles, overall and per split (in order of first
        appearance); and every row's split and n_tokens, for the histogram."""
        self._compact()
        lengths = pl.concat(self.lengths)

        def stats(n: pl.Series, words: pl.Series) -> dict:
            return {
                "rows": n.len(),
                "tokens": int(n.sum()),
                "vocabulary_size": words.drop_nulls().n_unique(),
                "n_tokens_mean": round(float(n.mean()), 2),
                **{f"n_tokens_p{p}": int(n.quantile(p / 100, "nearest")) for p in PERCENTILES},
                "n_tokens_max": int(n.max()),
            }

        splits = {
            split: stats(part["n_tokens"], self.vocab.filter(pl.col("split") == split)["tokens"])
            for (split,), part in lengths.group_by("split", maintain_order=True)
        }
        return {**stats(lengths["n_tokens"], self.vocab["tokens"]), "per_split": splits}, lengths


def token_stats(table: pl.DataFrame) -> dict:
    """Vocabulary size and token-count percentiles of a whole tokens table (see TokenStats)."""
    stats = TokenStats()
    stats.add(table)
    return stats.report()[0]


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
    import pyarrow.parquet as pq

    params = load_section("tokenize", TokenizeParams)
    log.info("params %s", params)
    source = pq.ParquetFile(require_file(paths.CLEAN))
    batches = source.iter_batches(batch_size=params.batch_size, columns=["id", "split", "text"])
    stats = TokenStats()
    with tqdm(total=source.metadata.num_rows, desc="tokenize", unit="row", mininterval=1) as bar:

        def counted(tables: Iterable[pl.DataFrame]) -> Iterator[pl.DataFrame]:
            for table in tables:
                bar.update(table.height)
                yield stats.add(table)

        chunks = (pl.from_arrow(batch) for batch in batches)
        tables = tokenize_stream(chunks, params.n_process, params.batch_size)
        write_table_stream(counted(tables), paths.TOKENS)
    report, lengths = stats.report()
    log.info(
        "%d rows, %d tokens, vocabulary %d, p95 %d tokens",
        report["rows"],
        report["tokens"],
        report["vocabulary_size"],
        report["n_tokens_p95"],
    )
    write_json(report, paths.TOKENS_REPORT)
    write_csv(length_histogram(lengths), paths.TOKEN_LENGTHS)


if __name__ == "__main__":
    run_main(main, "tokenize")
