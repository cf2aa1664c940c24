"""Shared test fixtures: tiny data and a tiny randomly initialised BERT, built here, never downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT with random weights (safetensors) and the packaged MiniLM tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from stages.common import PACKAGED_BASE_MODEL, resolve_base_model
    from tests.pipeline_fixture import AG_NEWS_LABELS

    out = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(PACKAGED_BASE_MODEL))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=len(AG_NEWS_LABELS),
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    """A git+DVC project that has run the whole pipeline on the tiny model once, committed.

    Shared by the tests that drive dvc: they clone it (tests.pipeline_fixture.clone), never change it.
    """
    from tests.pipeline_fixture import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_pipeline") / "repo", tiny_bert_dir)


# --- train / evaluate (issue 4) ---
NEWS_TOPICS = (
    "election minister parliament war treaty",
    "match goal season coach league",
    "shares profit market bank earnings",
    "software chip internet space computer",
)


def make_news_rows(n_per_class: int, split: str = "train"):
    """Rows of the processed-table contract; each class has its own words, so a model can learn."""
    import polars as pl

    rows = [
        {
            "id": f"{split}-{label}-{i}",
            "split": split,
            "label": label,
            "text": f"{words.split()[i % 5]} report {i}: {words} today",
            "augmented_from": None,
            "op": "original",
        }
        for label, words in enumerate(NEWS_TOPICS)
        for i in range(n_per_class)
    ]
    return pl.DataFrame(rows, schema_overrides={"augmented_from": pl.String})


@pytest.fixture(scope="session")
def news_rows():
    """`news_rows(n_per_class, split="train")` → a tiny Polars frame (see make_news_rows)."""
    return make_news_rows
