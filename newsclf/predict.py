"""Apply an exported model (`models/onnx/`) to texts with ONNX Runtime.

This module is the whole inference path of `newsclf predict`. It imports neither torch nor
transformers, only `tokenizers`, `onnxruntime` and numpy, so that a one-text call starts in a
fraction of a second; keep it that way (tests/test_predict.py checks it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

META_FILE = "newsclf_onnx.json"
TOKENIZER_FILE = "tokenizer.json"
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "int8")
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


def pad_batch(ids: Sequence[list[int]], pad_id: int) -> dict[str, np.ndarray]:
    """Model inputs for a batch of token-id lists, right-padded to the longest one."""
    width = max(len(seq) for seq in ids)
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(ids), width), dtype=np.int64)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = seq
        attention_mask[row, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class PredictError(Exception):
    """A fault the user can fix (missing model folder, unreadable input): one clear line."""


@dataclass(frozen=True)
class Encoded:
    """Token ids of texts, unpadded, and how long each text was before truncation."""

    ids: list[list[int]]
    n_tokens: list[int]

    @property
    def truncated(self) -> list[bool]:
        return [n > len(ids) for ids, n in zip(self.ids, self.n_tokens, strict=True)]


@dataclass(frozen=True)
class Prediction:
    """`label`: the top label, or None when its score is below the asked min confidence (the
    text is abstained on: a person should look); `top_label` is the top label either way."""

    label: str | None
    scores: dict[str, float]
    top_label: str

    @property
    def abstained(self) -> bool:
        return self.label is None


# The range evaluate fits a temperature in (stages/calibration.py's T_MIN, T_MAX; a test checks
# they agree): outside it a folder's temperature is corrupt, and would flatten or overflow scores.
TEMPERATURE_RANGE = (0.05, 20.0)


def check_temperature(value: object, meta_path: Path) -> float:
    """A folder's calibration temperature; a PredictError naming the file unless it is a number
    within TEMPERATURE_RANGE."""
    low, high = TEMPERATURE_RANGE
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise PredictError(
            f"{meta_path}: calibration.temperature {value!r} is not a number from {low} to {high}"
        )
    return float(value)


def check_min_confidence(value: object) -> float | None:
    """A min confidence as given (None: answer every text); a PredictError unless in [0, 1]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise PredictError(f"min confidence {value!r}: expected a number from 0 to 1")
    return float(value)


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build has it, with CPU as the fallback ORT itself applies per node."""
    if CUDA_PROVIDER in ort.get_available_providers():
        return [CUDA_PROVIDER, CPU_PROVIDER]
    return [CPU_PROVIDER]


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """ORT session options; `threads` caps the intra-op pool (default: ORT's, one per core).

    The stored graphs are already fused offline by the export stage; ORT's online passes at the
    default level (all) cost about as much session-creation time as the basic ones on them
    (0.2-0.3 s for the int8 MiniLM), so they are left at the default. Measurements behind these
    choices are in docs/export_predict.md.
    """
    opts = ort.SessionOptions()
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # a BERT graph is one chain of ops
    # Idle pool threads sleep instead of spinning: on a busy 2-core machine spinning took cores
    # from other work (and from this process's own tokenizer) for no measured gain at batch 64.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # errors only: ORT's warnings would drown the table on stderr
    return opts


def read_meta(model_dir: Path) -> dict:
    """The exported folder's META_FILE; a PredictError naming the folder when it is missing."""
    meta_path = model_dir / META_FILE
    if not meta_path.is_file():
        raise PredictError(
            f"{model_dir}: no exported model here ({META_FILE} missing); "
            "run `dvc repro export` or pass --model DIR"
        )
    return json.loads(meta_path.read_text(encoding="utf-8"))


class OnnxClassifier:
    """An exported model folder: tokenizer, labels, max length and an ONNX Runtime session."""

    def __init__(
        self,
        model_dir: str | Path,
        precision: str = "auto",
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        meta: dict | None = None,
    ) -> None:
        """`meta`: the folder's metadata when it is not written yet (the export stage checks its
        graphs before it writes META_FILE); otherwise read from the folder."""
        model_dir = Path(model_dir)
        meta = meta if meta is not None else read_meta(model_dir)
        self.labels: list[str] = list(meta["labels"])
        self.max_length: int = int(meta["max_length"])
        self.pad_id: int = int(meta["pad_id"])
        self.providers = list(providers) if providers is not None else default_providers()
        # Set when the precision used is not the one asked for or its graph's parity is short.
        self.notice: str | None = None
        self.precision = self._pick_precision(precision, meta["models"], meta.get("int8_parity"))
        # Scores are softmax(logits / temperature): the temperature evaluate fitted on held-out
        # rows. A folder exported before calibration existed has none: raw softmax, and
        # `calibrated` False (serve's /metadata says so).
        calibration = meta.get("calibration") or {}
        self.temperature = check_temperature(
            calibration.get("temperature", 1.0), model_dir / META_FILE
        )
        self.calibrated = bool(calibration.get("fitted", False))
        model_path = model_dir / meta["models"][self.precision]
        for path in (model_path, model_dir / TOKENIZER_FILE):
            if not path.is_file():
                raise PredictError(f"{path}: missing from the exported model folder")
        self.tokenizer = Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
        # Truncation is done here, by count, so that each text's full length is known for notices.
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        try:
            self.session = ort.InferenceSession(
                str(model_path), sess_options=session_options(threads), providers=self.providers
            )
        except Exception as err:  # ORT raises its own untyped errors for corrupt/foreign files
            raise PredictError(f"{model_path}: ONNX Runtime cannot load it ({err})") from err

    def _pick_precision(
        self, precision: str, models: dict[str, str], int8_parity: dict | None
    ) -> str:
        if precision not in PRECISIONS:
            raise PredictError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        missed = int8_parity is not None and not int8_parity["meets_bound"]
        shortfall = (
            f"the int8 model's top-1 agreement with PyTorch at export, "
            f"{int8_parity['top1_agreement']:.4f}, is below its bound "
            f"{int8_parity['min_agreement']}"
            if missed
            else ""
        )
        if precision == "auto":
            # Dynamically quantised int8 ops (MatMulInteger, QAttention) run on the CPU provider
            # only, so on a GPU the fp32 graph is the fast one; on a CPU the int8 graph is.
            on_gpu = self.providers[0] == CUDA_PROVIDER
            precision = "fp32" if on_gpu or "int8" not in models or missed else "int8"
            if missed and not on_gpu:
                self.notice = f"using the fp32 model: {shortfall}"
        elif precision == "int8" and missed:
            self.notice = f"int8 as asked, though {shortfall}"
        if precision not in models:
            raise PredictError(
                f"this exported model has no {precision} graph (has: {sorted(models)})"
            )
        return precision

    def encode(self, texts: Sequence[str]) -> Encoded:
        """Token ids with special tokens, cut to max_length keeping the closing special tokens."""
        encodings = self.tokenizer.encode_batch(list(texts))
        ids, n_tokens = [], []
        for enc in encodings:
            seq = enc.ids
            n_tokens.append(len(seq))
            if len(seq) > self.max_length:
                # Same result as the HF tokenizer's truncation=True: head of the text plus the
                # special tokens the template closes it with (`[SEP]`, `</s>`; none for GPT-2 or
                # Llama), so the model sees a well-formed sequence.
                mask = enc.special_tokens_mask
                closing = next((i for i, special in enumerate(reversed(mask)) if not special), 0)
                seq = seq[: self.max_length - closing] + seq[len(seq) - closing :]
            ids.append(seq)
        return Encoded(ids=ids, n_tokens=n_tokens)

    def logits(
        self,
        ids: Sequence[list[int]],
        batch_size: int = 64,
        on_batch: Callable[[int], None] | None = None,
        by_length: bool = True,
    ) -> np.ndarray:
        """Logits (n, labels) in input order; batches are formed by length to cut padding,
        unless `by_length` is False (batches in input order, as the parity check wants)."""
        if not ids:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        order = list(range(len(ids)))
        if by_length:
            order.sort(key=lambda i: len(ids[i]))
        out = np.empty((len(ids), len(self.labels)), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            (batch_logits,) = self.session.run(None, pad_batch([ids[i] for i in rows], self.pad_id))
            out[rows] = batch_logits
            if on_batch is not None:
                on_batch(len(rows))
        return out

    def predictions(
        self, logits: np.ndarray, min_confidence: float | None = None
    ) -> list[Prediction]:
        """Calibrated probabilities (softmax of logits / temperature) and the top label for each
        row of logits; with `min_confidence`, a row whose top score is below it gets no label."""
        scaled = logits.astype(np.float64) / self.temperature
        scaled -= scaled.max(axis=1, keepdims=True)
        probs = np.exp(scaled)
        probs /= probs.sum(axis=1, keepdims=True)
        out = []
        for row in probs:
            top = int(row.argmax())
            sure = min_confidence is None or row[top] >= min_confidence
            out.append(
                Prediction(
                    label=self.labels[top] if sure else None,
                    scores={name: float(p) for name, p in zip(self.labels, row, strict=True)},
                    top_label=self.labels[top],
                )
            )
        return out
