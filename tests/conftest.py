"""Shared test fixtures: tiny data and a tiny randomly initialised BERT, built here, never downloaded,
and what is expensive to make from them (a trained adapter, an exported ONNX folder, a whole tiny
pipeline), made once per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# The modules whose tests clone the `tiny_pipeline` fixture: one xdist worker runs them all, so
# that the whole tiny pipeline is built once (a `dvc repro` of every stage, ~50 s).
TINY_PIPELINE_MODULES = ("test_e2e.py", "test_workflows.py", "test_remote.py")


# Started first, in this order, on whichever worker is free: the longest work units (the tiny
# pipeline's modules; the multi-process training runs; the sweep through DVC's queue). Left to
# xdist's order (most tests first) they started last.
FIRST_SCOPES = ("tiny_pipeline", "tests/test_multiprocess.py", "tests/test_sweep_queue.py")


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's `loadscope` (whole modules to a worker, so each module's fixtures are made
    once), with the tiny pipeline's modules as one scope, and the longest scopes first. (xdist's
    own `loadgroup` marks do not group under pytest 9: it renames node ids through an attribute
    pytest 9 no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ModulesAndTinyPipeline(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "tiny_pipeline" if Path(module).name in TINY_PIPELINE_MODULES else module

        def _assign_work_unit(self, node) -> None:
            # The work queue is ordered; indexes into each worker's collection must not change.
            for scope in FIRST_SCOPES:
                if scope in self.workqueue:
                    self.workqueue.move_to_end(scope, last=False)
                    break
            super()._assign_work_unit(node)

    return ModulesAndTinyPipeline(config, log)


def machine_precision() -> str:
    """What `train.precision: auto` trains in on this CPU: bf16 where it is native, else fp32.
    Tests that train a k-bit base use it, so they pass on every x86 CPU."""
    from stages.modeling import native_bf16

    return "bf16" if native_bf16(cuda=False)[0] else "fp32"


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT with random weights (safetensors) and the packaged MiniLM tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from stages.modeling import PACKAGED_BASE_MODEL, resolve_base_model
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


@pytest.fixture(scope="session")
def tokenized_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git+DVC project that has run ingest, clean and tokenize on the raw fixture, committed.
    Tests clone it, never change it."""
    from tests.pipeline_fixture import build_tokenized_project

    return build_tokenized_project(tmp_path_factory.mktemp("tokenized") / "repo")


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


@dataclass(frozen=True)
class TrainedAdapter:
    """An adapter trained by the train stage's core on `news_rows`, with what made it."""

    adapter_dir: Path
    params: object  # stages.train_params.TrainParams
    train_rows: object  # polars.DataFrame: the rows it trained on
    result: object  # stages.train.TrainResult


def tiny_train_params(base: Path, **overrides):
    """params.yaml's `train:` section fitted to the tiny model and data: 10 epochs of 4 steps at a
    high learning rate, enough for the tiny BERT to learn the fixture's topic words."""
    from dataclasses import replace

    from stages.params import load_section
    from stages.train_params import TrainParams

    repo = load_section("train", TrainParams, REPO_ROOT / "params.yaml")
    lora = replace(
        repo.lora,
        r=4,
        alpha=8,
        dropout=0.0,
        target_modules=("query", "value"),
        modules_to_save=("classifier", "pooler"),
    )
    fitted = dict(
        base_model=str(base),
        max_train_samples=None,
        val_fraction=0.2,
        epochs=10,
        batch_size=8,
        learning_rate=0.05,
        max_length=16,
        checkpoint_steps=2,
        torch_threads=None,
        quantization="none",
        precision="fp32",
        seed=0,
        lora=lora,
    )
    return replace(repo, **(fitted | overrides))


@pytest.fixture(scope="session")
def trained_adapter(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """`trained_adapter(quantization)` → a TrainedAdapter for "none" (fp32) or "4bit" (QLoRA in
    the machine's precision), each trained once per session on news_rows(10)."""
    from stages.processed import split_train_val
    from stages.train import train_model
    from tests.pipeline_fixture import AG_NEWS_LABELS

    made: dict[str, TrainedAdapter] = {}

    def get(quantization: str) -> TrainedAdapter:
        if quantization not in made:
            precision = "fp32" if quantization == "none" else machine_precision()
            params = tiny_train_params(
                tiny_bert_dir, quantization=quantization, precision=precision
            )
            root = tmp_path_factory.mktemp(f"trained_{quantization}")
            rows = make_news_rows(10)
            rows.write_parquet(root / "train.parquet")
            train_rows, val_rows = split_train_val(rows, params.val_fraction, params.seed)
            result = train_model(
                train_rows,
                val_rows,
                params,
                AG_NEWS_LABELS,
                data_path=root / "train.parquet",
                checkpoint_dir=root / "checkpoints",
                adapter_dir=root / "adapter",
                live_dir=None,
            )
            made[quantization] = TrainedAdapter(root / "adapter", params, train_rows, result)
        return made[quantization]

    return get


# Texts of many lengths (one longer than the export's 32 word pieces) for the tiny export.
EXPORT_TEXTS = (
    "Short.",
    "Stocks rallied on Wall Street after the central bank kept rates unchanged.",
    "The home side won the final in extra time after a goal from the substitute striker.",
    "A long dispatch " + "about spacecraft, markets, elections and football " * 12,
    "NASA probe",
    "Oil prices fell sharply as supply worries eased across the region this week.",
)
EXPORT_MAX_LENGTH = 32


@pytest.fixture(scope="session")
def tiny_onnx(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The export stage's folder for a random seed-0 LoRA adapter on the tiny BERT (fp32 + int8,
    every int8 node quantized), and the stage's Exported record (merged model, tokenizer)."""
    from stages.evaluate import merged_logits
    from stages.export import Int8Plan, ParityParams, export_folder
    from tests.lora_fixture import make_adapter
    from tests.pipeline_fixture import AG_NEWS_LABELS

    adapter = make_adapter(tiny_bert_dir, tmp_path_factory.mktemp("adapter"))
    out = tmp_path_factory.mktemp("export") / "onnx"
    texts = list(EXPORT_TEXTS)
    # Agreement 0 is met with every node quantised: this fixture checks the int8 mechanics.
    exported = export_folder(
        adapter,
        str(tiny_bert_dir),
        AG_NEWS_LABELS,
        out,
        17,
        EXPORT_MAX_LENGTH,
        Int8Plan(texts * 4, min_agreement=0.0, max_fp32_nodes=4, batch_size=4),
        texts,
        merged_logits(adapter, str(tiny_bert_dir), AG_NEWS_LABELS, texts, EXPORT_MAX_LENGTH, 4),
        ParityParams(n_texts=len(texts), max_abs_logit_diff=1e-4, min_int8_agreement=0.0),
        batch_size=4,
    )
    return out, exported
