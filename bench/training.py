"""What the training benchmarks share: the train stage's data split and a throw-away training run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from stages.common import load_labels
from stages.processed import read_processed, split_train_val
from stages.train import TrainResult, train_model
from stages.train_params import TrainParams


@dataclass(frozen=True)
class BenchData:
    train_file: Path
    train: pl.DataFrame
    val: pl.DataFrame
    test: pl.DataFrame
    label_names: tuple[str, ...]


def load_bench_data(data_dir: Path, params: TrainParams) -> BenchData:
    """`data_dir/{train,test}.parquet`, train split into train/validation as the train stage does."""
    train_file = data_dir / "train.parquet"
    label_names = load_labels()
    train, val = split_train_val(
        read_processed(train_file, "train", label_names),
        params.val_fraction,
        params.seed,
        params.max_train_samples,
    )
    test = read_processed(data_dir / "test.parquet", "test", label_names)
    return BenchData(train_file, train, val, test, label_names)


def train_in(folder: Path, data: BenchData, params: TrainParams) -> tuple[TrainResult, Path]:
    """Train as the stage does, checkpoints and adapter under `folder`, no dvclive; the adapter dir."""
    adapter_dir = folder / "adapter"
    result = train_model(
        data.train,
        data.val,
        params,
        data.label_names,
        data_path=data.train_file,
        checkpoint_dir=folder / "checkpoints",
        adapter_dir=adapter_dir,
        live_dir=None,
    )
    return result, adapter_dir
