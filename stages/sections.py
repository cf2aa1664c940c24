"""Every section of params.yaml but `train:` (stages/train_params.py) as a frozen dataclass: the
schema of params.yaml, in one light module (no torch, spaCy or cleanlab to import), so that the
`validate_params` stage checks all of it in a moment before any stage runs. Each stage reads its
section with `stages.params.load_section(<section>, <its class>)`.

Fields have no defaults: params.yaml holds them, so nothing here can drift from it. What types
cannot say (ranges, a rule between two keys) each class checks in `__post_init__`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from stages.params import check_values

URL_MODES = ("remove", "keep", "token")
QUANTIZATION_MODES = ("auto", "none", "4bit", "8bit")
PRECISION_MODES = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class IngestParams:
    """The `ingest:` section of params.yaml; each source entry is checked by `parse_sources`."""

    sources: tuple[dict, ...]
    max_rejected_share: float
    fold_label_case: bool

    def __post_init__(self) -> None:
        check_values(
            self,
            {"max_rejected_share": (0 <= self.max_rejected_share <= 1, "between 0 and 1")},
        )


@dataclass(frozen=True)
class CleanParams:
    """The `clean:` section of params.yaml (stages/params.py parses it)."""

    urls: Literal[URL_MODES]
    min_chars: int
    max_chars: int

    def __post_init__(self) -> None:
        check_values(
            self,
            {
                "min_chars": (self.min_chars >= 0, ">= 0"),
                "max_chars": (self.max_chars >= self.min_chars, ">= clean.min_chars"),
            },
        )


@dataclass(frozen=True)
class TokenizeParams:
    """The `tokenize:` section of params.yaml (stages/params.py parses it)."""

    n_process: int  # spaCy worker processes (the output does not depend on it)
    batch_size: int  # rows per chunk sent to a worker

    def __post_init__(self) -> None:
        check_values(
            self,
            {
                "n_process": (self.n_process >= 1, ">= 1"),
                "batch_size": (self.batch_size >= 1, ">= 1"),
            },
        )


MODELS: tuple[str, ...] = ("tfidf_lr", "embedding_lr", "embedding_knn")
ACTIONS: tuple[str, ...] = ("flag", "drop", "relabel")
FILTERS: tuple[str, ...] = (
    "prune_by_noise_rate",
    "prune_by_class",
    "both",
    "confident_learning",
    "predicted_neq_given",
    "low_normalized_margin",
    "low_self_confidence",
)


@dataclass(frozen=True)
class LabelIssuesParams:
    """The `label_issues:` section of params.yaml (stages/params.py parses it)."""

    models: tuple[Literal[MODELS], ...]
    embedding_model: str
    precision: Literal[PRECISION_MODES]
    folds: int
    seed: int
    filter_by: Literal[FILTERS]
    action: Literal[ACTIONS]
    relabel_min_confidence: float

    def __post_init__(self) -> None:
        check_values(
            self,
            {
                "models": (len(self.models) > 0, f"one or more of {list(MODELS)}"),
                "folds": (self.folds >= 2, ">= 2"),
                "relabel_min_confidence": (0.0 <= self.relabel_min_confidence <= 1.0, "in [0, 1]"),
            },
        )


@dataclass(frozen=True)
class OpParams:
    enabled: bool
    rate: float  # share of a row's lowercase words the op changes

    def __post_init__(self) -> None:
        check_values(self, {"rate": (not self.enabled or 0.0 < self.rate <= 1.0, "in (0, 1]")})


@dataclass(frozen=True)
class OpsParams:
    synonym: OpParams
    swap: OpParams
    delete: OpParams
    insert: OpParams


@dataclass(frozen=True)
class AugmentParams:
    """The `augment:` section of params.yaml (stages/params.py parses it)."""

    reviews: str  # the reviews file (stages/reviews.py), relative to the repository root
    n_aug: int
    seed: int
    ops: OpsParams
    synonym_model: str
    synonym_top_k: int
    synonym_min_similarity: float

    def __post_init__(self) -> None:
        check_values(
            self,
            {
                "reviews": (
                    bool(self.reviews.strip()) and not Path(self.reviews).is_absolute(),
                    "a path inside the repository (DVC tracks it as a dependency)",
                ),
                "n_aug": (self.n_aug >= 0, ">= 0"),
                "synonym_top_k": (self.synonym_top_k >= 1, ">= 1"),
                "synonym_min_similarity": (-1 <= self.synonym_min_similarity <= 1, "in [-1, 1]"),
            },
        )


@dataclass(frozen=True)
class EvaluateParams:
    """The `evaluate:` section of params.yaml (stages/params.py parses it)."""

    batch_size: int  # texts per inference batch

    def __post_init__(self) -> None:
        check_values(self, {"batch_size": (self.batch_size >= 1, ">= 1")})


@dataclass(frozen=True)
class ParityParams:
    n_texts: int  # test texts the parity check runs on
    max_abs_logit_diff: float  # fp32 bound: a breach fails the stage
    min_int8_agreement: float  # int8 bound: a miss makes predict default to fp32

    def __post_init__(self) -> None:
        check_values(
            self,
            {
                "n_texts": (self.n_texts >= 1, ">= 1"),
                "max_abs_logit_diff": (self.max_abs_logit_diff > 0, "> 0"),
                "min_int8_agreement": (0 <= self.min_int8_agreement <= 1, "in [0, 1]"),
            },
        )


@dataclass(frozen=True)
class ExportParams:
    """The `export:` section of params.yaml (stages/params.py parses it)."""

    opset: int
    quantize: bool
    int8_calibration_texts: int
    int8_max_fp32_nodes: int
    int8_smoothing: float | None  # SmoothQuant's alpha for the int8 graph's MatMuls; None: off
    batch_size: int
    parity: ParityParams

    def __post_init__(self) -> None:
        check_values(
            self,
            {
                "int8_calibration_texts": (self.int8_calibration_texts >= 1, ">= 1"),
                "int8_max_fp32_nodes": (self.int8_max_fp32_nodes >= 0, ">= 0"),
                "int8_smoothing": (
                    self.int8_smoothing is None or 0 < self.int8_smoothing <= 1,
                    "null or in (0, 1]",
                ),
                "batch_size": (self.batch_size >= 1, ">= 1"),
            },
        )


@dataclass(frozen=True)
class ReportParams:
    """The `report:` section of params.yaml (stages/params.py parses it)."""

    top_suspects: int  # label suspects listed on the page

    def __post_init__(self) -> None:
        check_values(self, {"top_suspects": (self.top_suspects >= 0, ">= 0")})


@dataclass(frozen=True)
class MonitorParams:
    """The `monitor:` section of params.yaml: `newsclf monitor`'s bounds (newsclf/monitor.py)."""

    min_texts: int  # fewer logged texts than this: too few to judge
    max_label_tvd: float  # predicted label shares vs train's: total variation distance
    max_confidence_drop: float  # mean top-label confidence below the test split's
    max_length_ks: float  # KS statistic of text lengths vs train's
    max_oov_increase: float  # unseen-word share above train's own held-out share
    max_domain_auc: float  # ROC AUC of a classifier telling logged from train texts
    sample_texts: int  # texts per side for the vocabulary and domain checks
    seed: int

    def __post_init__(self) -> None:
        check_values(
            self,
            {
                "min_texts": (self.min_texts >= 10, ">= 10"),
                "max_label_tvd": (0 < self.max_label_tvd <= 1, "in (0, 1]"),
                "max_confidence_drop": (0 < self.max_confidence_drop <= 1, "in (0, 1]"),
                "max_length_ks": (0 < self.max_length_ks <= 1, "in (0, 1]"),
                "max_oov_increase": (0 < self.max_oov_increase <= 1, "in (0, 1]"),
                "max_domain_auc": (0.5 < self.max_domain_auc <= 1, "in (0.5, 1]"),
                "sample_texts": (self.sample_texts >= 100, ">= 100"),
            },
        )
