"""The `newsclf` console command: `newsclf predict` classifies news texts with the exported model;
`newsclf serve` serves it over HTTP (newsclf/serve.py); `newsclf monitor DIR` checks the texts
`serve --log DIR` logged for drift (newsclf/monitor.py); `newsclf review` serves a page to decide
label suspects (newsclf/review.py); `newsclf preset NAME` prints a params preset as `dvc exp run`
arguments.

Texts come from arguments, a file (`--file`: one text per line, or CSV/Parquet with a `text`
column) or stdin (newsclf/inputs.py). They stream: read, scored and printed a chunk at a time, so
memory stays flat at any input size and results appear while input is still coming. Output is a
table, or with `--json` one JSON object per text carrying its line/row number (and `id`). Only the
light inference path is imported (no torch, no transformers), so a one-text call starts fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from newsclf.inputs import InputError, open_source
from stages.paths import ONNX as DEFAULT_MODEL_DIR  # where the export stage writes the model

PROGRESS_DELAY_S = 2.0  # a shorter run shows no progress bar
MAX_LISTED = 5  # notices name at most this many inputs, then count the rest
# Texts per chunk, in batches: sorting by length inside 32 batches pads about as little as sorting
# the whole input (bench/bench_predict.py), and a chunk of 2,048 texts holds a few MB.
CHUNK_BATCHES = 32
ABSTAINED = "-"  # the label column of a text below --min-confidence


def notice(message: str) -> None:
    print(f"newsclf: notice: {message}", file=sys.stderr)


def listed(numbers: Sequence[int]) -> str:
    return ", ".join(str(n) for n in numbers[:MAX_LISTED])


class Tally:
    """Numbers of the inputs a notice is about: the first few kept, all counted."""

    def __init__(self) -> None:
        self.count, self.first = 0, []

    def add(self, numbers: Sequence[int]) -> None:
        self.count += len(numbers)
        self.first.extend(numbers[: MAX_LISTED - len(self.first)])

    def said(self) -> str:
        more = self.count - len(self.first)
        return listed(self.first) + (f" and {more} more" if more > 0 else "")


def table_header(unit: str, labels: Sequence[str]) -> str:
    width = max(len(label) for label in labels)
    scores = "  ".join(f"{lab:>8}" for lab in labels)
    return f"{unit:>8}  {'label':<{width}}  {scores}  text"


def table_row(item, pred, labels: Sequence[str]) -> str:
    width = max(len(label) for label in labels)
    preview = " ".join(item.text.split())
    preview = preview if len(preview) <= 60 else preview[:57] + "..."
    scores = "  ".join(f"{pred.scores[lab]:>8.3f}" for lab in labels)
    label = ABSTAINED if pred.abstained else pred.label
    return f"{item.number:>8}  {label:<{width}}  {scores}  {preview}"


def json_row(unit: str, item, pred) -> str:
    """`label` is null for a text below --min-confidence; `top_label` is the model's either way."""
    record = {unit: item.number}
    if item.id is not None:
        record["id"] = item.id
    return json.dumps(
        record | {"label": pred.label, "top_label": pred.top_label, "scores": pred.scores}
    )


def progress_bar(source):
    """A progress bar on stderr that appears only if the run lasts PROGRESS_DELAY_S."""
    from tqdm import tqdm

    return tqdm(
        total=source.total,
        desc=f"classifying {source.name}",
        unit="text",
        delay=PROGRESS_DELAY_S,
        file=sys.stderr,
    )


@dataclass
class Printed:
    """The number of the last input whose result is printed (None before the first)."""

    last: int | None = None


def chunks_saying_where_output_ends(source, printed: Printed) -> Iterator[list]:
    """The source's chunks; an input fault after some output says where that output ends, so that
    whoever reads a partial result knows which inputs it covers."""
    try:
        yield from source.chunks
    except InputError as err:
        if printed.last is None:
            raise
        raise InputError(
            f"{err}; the output above ends at {source.unit} {printed.last}, nothing after it was "
            "classified"
        ) from err


def predict(args: argparse.Namespace) -> int:
    """Classify chunk by chunk: read, encode, score and print, results in input order."""
    from newsclf.predict import OnnxClassifier, check_min_confidence

    min_confidence = check_min_confidence(args.min_confidence)
    source = open_source(args.texts, args.file, args.batch_size * CHUNK_BATCHES, sys.stdin.isatty())
    classifier = OnnxClassifier(args.model, precision=args.precision, threads=args.threads)
    if classifier.notice:
        notice(classifier.notice)
    labels = classifier.labels
    empty, truncated, abstained = Tally(), Tally(), Tally()
    classified, printed = 0, Printed()
    with progress_bar(source) as bar:
        for chunk in chunks_saying_where_output_ends(source, printed):
            is_text = [item.text is not None and item.text.strip() != "" for item in chunk]
            items = [item for item, ok in zip(chunk, is_text, strict=True) if ok]
            empty.add([item.number for item, ok in zip(chunk, is_text, strict=True) if not ok])
            encoded = classifier.encode([item.text for item in items])
            truncated.add(
                [i.number for i, cut in zip(items, encoded.truncated, strict=True) if cut]
            )
            predictions = classifier.predictions(
                classifier.logits(encoded.ids, args.batch_size), min_confidence
            )
            abstained.add(
                [i.number for i, p in zip(items, predictions, strict=True) if p.abstained]
            )
            if args.json:
                lines = [
                    json_row(source.unit, i, p) for i, p in zip(items, predictions, strict=True)
                ]
            else:
                lines = [table_row(i, p, labels) for i, p in zip(items, predictions, strict=True)]
                if items and classified == 0:
                    lines.insert(0, table_header(source.unit, labels))
            if lines:
                print("\n".join(lines), flush=True)
                printed.last = items[-1].number
            classified += len(items)
            bar.update(len(chunk))
    if empty.count:
        notice(
            f"skipped {empty.count} empty {source.unit}(s) in {source.name}: "
            f"{source.unit} {empty.said()}"
        )
    if truncated.count:
        notice(
            f"{truncated.count} text(s) longer than {classifier.max_length} tokens were "
            f"truncated: {source.unit} {truncated.said()}"
        )
    if abstained.count:
        notice(
            f"{abstained.count} text(s) scored below --min-confidence {min_confidence:g} got no "
            f"label (shown as {ABSTAINED}{'' if not args.json else ', label null in JSON'}): "
            f"{source.unit} {abstained.said()}"
        )
    if not classified:
        raise InputError(f"{source.name}: no texts to classify")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="newsclf", description="News topic classifier.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "predict",
        help="classify texts with the exported ONNX model",
        description="Classify texts (arguments, --file, or stdin one per line) into "
        "the classes the exported model was trained on (`labels` in params.yaml).",
    )
    p.add_argument("texts", nargs="*", help="texts to classify (default: read stdin)")
    p.add_argument(
        "-f",
        "--file",
        help="text file (one per line), or .csv/.parquet with a `text` column (and `id`)",
    )
    p.add_argument(
        "--model", type=Path, default=DEFAULT_MODEL_DIR, help="exported model folder (models/onnx)"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per text: its line/row/argument number, id, label, scores",
    )
    p.add_argument("--batch-size", type=int, default=64, help="texts per ONNX Runtime call")
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "int8"),
        default="auto",
        help="auto: int8 on CPU (fp32 if the int8 model missed its parity bound at export), "
        "fp32 on a CUDA GPU",
    )
    p.add_argument("--threads", type=int, default=None, help="ORT threads (default: one per core)")
    p.add_argument(
        "--min-confidence",
        type=float,
        default=None,
        metavar="P",
        help="give no label to a text whose top (calibrated) score is below P, 0-1: route those "
        "to a person (the model card gives the share answered at 95%% and 98%% accuracy)",
    )
    p.set_defaults(run=predict)
    p = commands.add_parser(
        "serve",
        help="serve the exported ONNX model over HTTP (POST /predict, GET /health, /metadata)",
        description="An HTTP service over the exported model: texts of concurrent requests are "
        "scored together in micro-batches. Listens on 127.0.0.1 unless --host says otherwise; "
        "put a reverse proxy with TLS in front of it before exposing it (README, Serve the model).",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--model", type=Path, default=DEFAULT_MODEL_DIR, help="exported model folder (models/onnx)"
    )
    p.add_argument(
        "--precision", choices=("auto", "fp32", "int8"), default="auto", help="as for predict"
    )
    p.add_argument("--threads", type=int, default=None, help="ORT threads (default: one per core)")
    p.add_argument(
        "--max-batch", type=int, default=32, help="texts of concurrent requests scored together"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="texts per ONNX Runtime call within a micro-batch, grouped by length",
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long the first text of a batch waits for others (milliseconds)",
    )
    p.add_argument("--max-texts", type=int, default=256, help="texts per request")
    p.add_argument("--max-chars", type=int, default=20_000, help="characters per text")
    p.add_argument(
        "--max-body-bytes", type=int, default=2_000_000, help="request body size (bytes)"
    )
    p.add_argument(
        "--body-timeout-s",
        type=float,
        default=10.0,
        help="a request body not received in full within this many seconds is answered 408",
    )
    p.add_argument(
        "--graceful-s",
        type=float,
        default=30.0,
        help="on SIGTERM/SIGINT, how long requests in flight may take to finish",
    )
    p.add_argument(
        "--log",
        type=Path,
        default=None,
        metavar="DIR",
        help="append every scored text (the text itself, its time, label, scores and the model "
        "file's hash) to rotating Parquet files in DIR, for `newsclf monitor` (off by default)",
    )
    p.add_argument(
        "--log-max-mb",
        type=float,
        default=1024.0,
        help="with --log: the oldest files are deleted once DIR's log files pass this size",
    )
    p.add_argument(
        "--log-rows-per-file",
        type=int,
        default=50_000,
        help="with --log: texts per Parquet file (a file is also written every 60 s)",
    )
    p.set_defaults(run=serve)
    p = commands.add_parser(
        "preset",
        help="print the `-S key=value` arguments of a params preset for `dvc exp run`",
        description="Print presets/NAME.yaml as `dvc exp run` arguments: "
        "`dvc exp run $(newsclf preset fast)`.",
    )
    p.add_argument("name", help="preset name: presets/NAME.yaml")
    p.set_defaults(run=print_preset)
    p = commands.add_parser(
        "sweep",
        help="search a recipe with DVC's experiment queue and select it on held-out train rows",
        description="run: queue one `dvc exp run` per point and seed of a sweep file and run "
        "them (again: only what is not done); show: the table, reports/sweep.json and a plot; "
        "apply: the winner's params into params.yaml (README, Experiments).",
    )
    p.add_argument("action", choices=("run", "show", "apply"))
    p.add_argument("file", type=Path, help="the sweep, e.g. sweeps/recipe.yaml")
    p.add_argument(
        "--out", type=Path, default=Path("reports/sweep.json"), help="show: where to write"
    )
    p.set_defaults(run=sweep)
    p = commands.add_parser(
        "monitor",
        help="check the texts `serve --log DIR` logged for drift from the train texts",
        description="Five drift checks of the logged texts against the model's train texts and "
        "its test-split confidence, bounds in params.yaml `monitor:`; writes monitor.json and "
        "monitor.html. Exit status 0: no drift, 1: drift, 2: a usage or input fault "
        "(docs/monitoring.md).",
    )
    p.add_argument("log_dir", type=Path, metavar="DIR", help="the folder of `serve --log DIR`")
    p.add_argument(
        "--model", type=Path, default=DEFAULT_MODEL_DIR, help="exported model folder (models/onnx)"
    )
    p.add_argument(
        "--reference",
        type=Path,
        default=Path("data/processed/train.parquet"),
        help="the model's train table (data/processed/train.parquet)",
    )
    p.add_argument("--out", type=Path, default=Path("reports/monitor"), help="report folder")
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="its `monitor:` bounds")
    p.add_argument("--since", help="only texts logged at or after this ISO date/time (UTC)")
    p.add_argument("--model-sha256", help="only texts scored by this model file (hash prefix)")
    p.set_defaults(run=monitor)
    from newsclf.review import add_review_parser

    add_review_parser(commands)  # `newsclf review [export|import]`
    return parser


def sweep(args: argparse.Namespace) -> int:
    from newsclf.sweep import main as sweep_main

    return sweep_main(args.action, args.file, args.out)


def monitor(args: argparse.Namespace) -> int:
    from newsclf.monitor import run_command

    return run_command(args)  # prints its own error line: exit status 2, not 1


def serve(args: argparse.Namespace) -> int:
    from newsclf.predict import read_meta
    from newsclf.serve import Limits, ServeConfig, TextLogConfig
    from newsclf.serve import serve as run_server

    for name in ("max_batch", "batch_size", "max_texts", "max_chars", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_wait_ms < 0:
        raise InputError("--max-wait-ms must be 0 or more")
    if args.body_timeout_s <= 0:
        raise InputError("--body-timeout-s must be more than 0")
    if args.log_max_mb <= 0 or args.log_rows_per_file < 1:
        raise InputError("--log-max-mb must be more than 0 and --log-rows-per-file at least 1")
    read_meta(args.model)  # a missing model folder fails here, before the server starts
    config = ServeConfig(
        model_dir=args.model,
        precision=args.precision,
        threads=args.threads,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        ort_batch=args.batch_size,
        limits=Limits(args.max_texts, args.max_chars, args.max_body_bytes, args.body_timeout_s),
        log=TextLogConfig(args.log, int(args.log_max_mb * 2**20), args.log_rows_per_file)
        if args.log is not None
        else None,
    )
    return run_server(config, args.host, args.port, args.graceful_s)


def print_preset(args: argparse.Namespace) -> int:
    from newsclf.preset import load_preset, set_param_args

    print(" ".join(set_param_args(load_preset(args.name))))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "batch_size", 1) < 1:
        print("newsclf: error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    from newsclf.predict import PredictError
    from newsclf.preset import PresetError
    from newsclf.sweep import SweepError

    try:
        return args.run(args)
    except (InputError, PredictError, PresetError, SweepError) as err:
        print(f"newsclf: error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `newsclf predict ... | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
