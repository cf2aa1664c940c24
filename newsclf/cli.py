"""The `newsclf` console command: `newsclf predict` classifies news texts with the exported model;
`newsclf preset NAME` prints a params preset as `dvc exp run` arguments.

Texts come from arguments, a file (`--file`: one text per line, or CSV/Parquet with a `text`
column) or stdin. Output is a table, or with `--json` one JSON object per text. Only the light
inference path is imported (no torch, no transformers), so a one-text call starts fast.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_MODEL_DIR = Path("models/onnx")
PROGRESS_MIN_TEXTS = 1000  # below this a run takes a second or two: no progress bar
MAX_LISTED = 5  # notices name at most this many texts, then count the rest


class InputError(Exception):
    """Unreadable or empty input: reported in one line, exit status 1."""


def notice(message: str) -> None:
    print(f"newsclf: notice: {message}", file=sys.stderr)


def listed(numbers: Sequence[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:MAX_LISTED])
    return shown + (f" and {len(numbers) - MAX_LISTED} more" if len(numbers) > MAX_LISTED else "")


def decode_utf8(data: bytes, source: str) -> str:
    """The bytes as text; binary data or another encoding is an InputError naming the place."""
    nul = data.find(b"\x00")
    if nul >= 0:
        raise InputError(f"{source}: binary data (NUL byte at offset {nul}), not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(
            f"{source}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"
        ) from err


def texts_from_table(path: Path) -> list[str | None]:
    """The `text` column of a CSV (with header) or Parquet file."""
    if path.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as err:
            raise InputError(f"{path}: not a readable Parquet file ({err})") from err
        if "text" not in table.column_names:
            raise InputError(f"{path}: no `text` column (has: {', '.join(table.column_names)})")
        column = table.column("text")
        if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
            raise InputError(f"{path}: column `text` is {column.type}, not strings")
        return column.to_pylist()
    reader = csv.DictReader(io.StringIO(decode_utf8(path.read_bytes(), str(path)), newline=""))
    if reader.fieldnames is None or "text" not in reader.fieldnames:
        raise InputError(f"{path}: CSV needs a header with a `text` column")
    return [row["text"] for row in reader]


def read_texts(args: argparse.Namespace) -> tuple[list[str], str]:
    """Texts to classify and a name for where they came from; empty ones dropped with a notice."""
    if args.texts and args.file:
        raise InputError("give texts as arguments or --file, not both")
    if args.texts:
        raw: list[str | None] = list(args.texts)
        source, unit = "arguments", "argument"
    elif args.file:
        path = Path(args.file)
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        if path.suffix.lower() in (".csv", ".parquet"):
            raw, source, unit = texts_from_table(path), str(path), "row"
        else:
            raw = decode_utf8(path.read_bytes(), str(path)).splitlines()
            source, unit = str(path), "line"
    else:
        if sys.stdin.isatty():
            raise InputError("no texts: give them as arguments, with --file, or on stdin")
        raw = decode_utf8(sys.stdin.buffer.read(), "stdin").splitlines()
        source, unit = "stdin", "line"
    empty = [n for n, text in enumerate(raw, start=1) if text is None or not text.strip()]
    if empty:
        notice(f"skipped {len(empty)} empty {unit}(s) in {source}: {unit} {listed(empty)}")
    texts = [text for text in raw if text is not None and text.strip()]
    if not texts:
        raise InputError(f"{source}: no texts to classify")
    return texts, source


def print_table(texts: Sequence[str], predictions: Sequence, labels: Sequence[str]) -> None:
    width = max(len(label) for label in labels)
    header = f"{'#':>4}  {'label':<{width}}  " + "  ".join(f"{lab:>8}" for lab in labels) + "  text"
    print(header)
    for n, (text, pred) in enumerate(zip(texts, predictions, strict=True), start=1):
        preview = " ".join(text.split())
        preview = preview if len(preview) <= 60 else preview[:57] + "..."
        scores = "  ".join(f"{pred.scores[lab]:>8.3f}" for lab in labels)
        print(f"{n:>4}  {pred.label:<{width}}  {scores}  {preview}")


def predict(args: argparse.Namespace) -> int:
    from newsclf.predict import OnnxClassifier

    texts, source = read_texts(args)
    classifier = OnnxClassifier(args.model, precision=args.precision, threads=args.threads)
    if classifier.notice:
        notice(classifier.notice)
    encoded = classifier.encode(texts)
    truncated = [n for n, cut in enumerate(encoded.truncated, start=1) if cut]
    if truncated:
        notice(
            f"{len(truncated)} text(s) longer than {classifier.max_length} tokens were truncated: "
            f"text {listed(truncated)}"
        )
    if len(texts) >= PROGRESS_MIN_TEXTS:
        from tqdm import tqdm

        with tqdm(total=len(texts), desc=f"classifying {source}", unit="text") as bar:
            logits = classifier.logits(encoded.ids, args.batch_size, on_batch=bar.update)
    else:
        logits = classifier.logits(encoded.ids, args.batch_size)
    predictions = classifier.predictions(logits)
    if args.json:
        for pred in predictions:
            print(json.dumps({"label": pred.label, "scores": pred.scores}))
    else:
        print_table(texts, predictions, classifier.labels)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="newsclf", description="News topic classifier.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "predict",
        help="classify texts with the exported ONNX model",
        description="Classify texts (arguments, --file, or stdin one per line) into "
        "World / Sports / Business / Sci/Tech.",
    )
    p.add_argument("texts", nargs="*", help="texts to classify (default: read stdin)")
    p.add_argument(
        "-f", "--file", help="text file (one per line), or .csv/.parquet with a `text` column"
    )
    p.add_argument(
        "--model", type=Path, default=DEFAULT_MODEL_DIR, help="exported model folder (models/onnx)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per text")
    p.add_argument("--batch-size", type=int, default=64, help="texts per ONNX Runtime call")
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "int8"),
        default="auto",
        help="auto: int8 on CPU (fp32 if the int8 model missed its parity bound at export), "
        "fp32 on a CUDA GPU",
    )
    p.add_argument("--threads", type=int, default=None, help="ORT threads (default: one per core)")
    p.set_defaults(run=predict)
    p = commands.add_parser(
        "preset",
        help="print the `-S key=value` arguments of a params preset for `dvc exp run`",
        description="Print presets/NAME.yaml as `dvc exp run` arguments: "
        "`dvc exp run $(newsclf preset fast)`.",
    )
    p.add_argument("name", help="preset name: presets/NAME.yaml")
    p.set_defaults(run=print_preset)
    return parser


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

    try:
        return args.run(args)
    except (InputError, PredictError, PresetError) as err:
        print(f"newsclf: error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `newsclf predict ... | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0
