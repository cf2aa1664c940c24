"""The processed tables (`data/processed/{train,test}.parquet`) as train, evaluate and export read
them: checked against the data contract, and train rows split into training and validation rows."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import polars as pl

from stages.common import StageError, check_contract, read_table


def check_table(
    df: pl.DataFrame, path: str | Path, split: str, label_names: tuple[str, ...]
) -> None:
    """Fail with the file, field and first bad row when `df` breaks the data contract or is not
    a table of `split` rows with non-empty texts and unique ids."""
    check_contract(df, path, label_names)
    bad_rules = {
        "empty text": pl.col("text").str.strip_chars() == "",
        f"split is not {split!r}": pl.col("split") != split,
    }
    for reason, expr in bad_rules.items():
        bad = df.with_row_index("row").filter(expr)
        if bad.height:
            first = bad.row(0, named=True)
            raise StageError(
                f"{path}: {bad.height} row(s) with {reason}; first: row {first['row']}, "
                f"id={first['id']!r}"
            )
    dup = df.filter(pl.col("id").is_duplicated())
    if dup.height:
        raise StageError(f"{path}: duplicate id {dup['id'][0]!r} ({dup.height} rows)")


def read_processed(path: str | Path, split: str, label_names: tuple[str, ...]) -> pl.DataFrame:
    """A processed table, read and checked against the data contract (see `check_table`)."""
    df = read_table(path)
    check_table(df, path, split, label_names)
    return df


def scored_labels(rows: pl.DataFrame) -> pl.Expr:
    """The label a held-out row is scored against: a person's (`reviewed_label`) where the reviews
    file decided it, else the label as ingested (`given_label`, before `label_issues.action`
    changed it), else `label` (a table from before augment kept either)."""
    columns = [c for c in ("reviewed_label", "given_label", "label") if c in rows.columns]
    return pl.coalesce(columns)


def held_out_ids(genuine: pl.DataFrame, val_fraction: float, seed: int) -> list[str]:
    """The validation ids: in each class (by `given_label` where present, the label before
    `label_issues` changed it), round(n * val_fraction) rows, those whose seeded hash of the id is
    lowest. A row's place in that order depends on its id alone, so dropping or relabelling other
    rows moves at most a row per class: recipes with and without `label_issues.action` are scored
    on (nearly) the same rows, and against the same labels."""
    stratum = "given_label" if "given_label" in genuine.columns else "label"
    ids: list[str] = []
    for label, rows in sorted(genuine.group_by(stratum), key=lambda item: item[0]):
        n_val = round(rows.height * val_fraction)
        if n_val < 1 or n_val >= rows.height:
            raise StageError(
                f"cannot hold out val_fraction={val_fraction}: class {label[0]} has "
                f"{rows.height} row(s), leaving {n_val} for validation"
            )
        keyed = sorted(
            rows["id"].to_list(),
            key=lambda id_: hashlib.sha256(f"{seed}:{id_}".encode()).digest(),
        )
        ids.extend(keyed[:n_val])
    return ids


def split_train_val(
    df: pl.DataFrame, val_fraction: float, seed: int, max_train_samples: int | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Seeded, label-stratified validation slice of the genuine rows (`held_out_ids`); the rest
    trains.

    Augmented rows derived from a validation row are dropped, or validation would score texts the
    model trained on. `max_train_samples` then keeps a seeded subset of the training rows (in their
    file order). `evaluate` calls this too, so its baseline sees exactly the same training rows.
    """
    genuine = df.filter(pl.col("op") == "original") if "op" in df.columns else df
    val_ids = held_out_ids(genuine, val_fraction, seed)
    is_val = pl.col("id").is_in(val_ids)
    if "augmented_from" in df.columns:
        is_val = is_val | pl.col("augmented_from").is_in(val_ids).fill_null(False)
    val = df.filter(pl.col("id").is_in(val_ids))
    train = df.filter(~is_val)
    if max_train_samples is not None and max_train_samples < train.height:
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(train.height, size=max_train_samples, replace=False))
        train = train[keep]
    return train, val
