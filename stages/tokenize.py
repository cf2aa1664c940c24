"""tokenize: spaCy tokens of every clean row, for augmentation and for the data report.

Uses the rule-based English tokenizer of `spacy.blank("en")` (no statistical model is needed or
downloaded) through `nlp.pipe` with `n_process` workers; order is preserved, so the output is the same
for any number of workers. Run as `python -m stages.tokenize`: run as a script, this file would shadow
the standard library's `tokenize` module.
"""

from __future__ import annotations

import polars as pl
import spacy
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


def tokenize_texts(
    texts: list[str], n_process: int = 1, batch_size: int = 1000
) -> list[tuple[list[str], list[bool]]]:
    """spaCy tokens of each text, in order, each with whether a space follows it.

    The flags let `augment` turn edited token lists back into text without guessing where spaces
    went: `"".join(t + " " * w for t, w in zip(tokens, whitespace)) == text`.
    """
    if n_process < 1 or batch_size < 1:
        raise StageError(
            f"params.yaml tokenize: n_process ({n_process}) and batch_size ({batch_size}) must be >= 1"
        )
    nlp = spacy.blank("en")
    docs = nlp.pipe(texts, n_process=n_process, batch_size=batch_size)
    return [
        ([tok.text for tok in doc], [bool(tok.whitespace_) for tok in doc])
        for doc in tqdm(docs, total=len(texts), desc="tokenize", unit="row", mininterval=1)
    ]


def tokens_table(df: pl.DataFrame, tokenized: list[tuple[list[str], list[bool]]]) -> pl.DataFrame:
    """The tokens table: id, split, tokens, whitespace, n_tokens, in the row order of `df`."""
    return df.select("id", "split").with_columns(
        pl.Series("tokens", [tokens for tokens, _ in tokenized], dtype=pl.List(pl.String)),
        pl.Series("whitespace", [space for _, space in tokenized], dtype=pl.List(pl.Boolean)),
        pl.Series("n_tokens", [len(tokens) for tokens, _ in tokenized], dtype=pl.Int64),
    )


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
