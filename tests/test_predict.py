"""`newsclf predict` on a tiny exported model: inputs from arguments, stdin, text/CSV/Parquet files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from newsclf.cli import main
from newsclf.predict import OnnxClassifier, PredictError
from tests.conftest import EXPORT_MAX_LENGTH as MAX_LENGTH
from tests.pipeline_fixture import AG_NEWS_LABELS as LABEL_NAMES

HEADLINES = [
    "Stocks rally as the central bank holds interest rates steady",
    "Home side wins the cup final in extra time",
    "New probe reaches the outer planets",
]


@pytest.fixture(scope="module")
def model_dir(tiny_onnx) -> Path:
    return tiny_onnx[0]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def expected_labels(model_dir: Path, texts: list[str]) -> list[str]:
    classifier = OnnxClassifier(model_dir)
    return [
        p.label for p in classifier.predictions(classifier.logits(classifier.encode(texts).ids))
    ]


def test_arguments_json(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["predict", "--model", str(model_dir), "--json", *HEADLINES], capsys)
    assert code == 0
    rows = json_lines(out)
    assert [row["label"] for row in rows] == expected_labels(model_dir, HEADLINES)
    assert [row["argument"] for row in rows] == [1, 2, 3]
    for row in rows:
        assert set(row) == {"argument", "label", "top_label", "scores"}
        assert row["top_label"] == row["label"]  # no --min-confidence: every text answered
        assert list(row["scores"]) == list(LABEL_NAMES)
        assert sum(row["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        assert row["label"] == max(row["scores"], key=row["scores"].get)


def test_table_output(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["predict", "--model", str(model_dir), HEADLINES[0]], capsys)
    assert code == 0
    header, row = out.splitlines()
    assert all(name in header for name in LABEL_NAMES)
    assert row.split()[1] == expected_labels(model_dir, HEADLINES[:1])[0].split()[0]
    assert "Stocks rally" in row


def test_stdin_without_torch(model_dir: Path) -> None:
    """A fresh process reading stdin; the predict path must not import torch or transformers."""
    probe = (
        "import sys; from newsclf.cli import main; code = main(sys.argv[1:]); "
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy; sys.exit(code)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, "predict", "--model", str(model_dir), "--json"],
        input="\n".join(HEADLINES) + "\n\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert len(json_lines(result.stdout)) == len(HEADLINES)
    assert "skipped 1 empty line" in result.stderr


def test_text_file_skips_empty_lines_and_truncates(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    long_text = "markets " * 100
    path = tmp_path / "texts.txt"
    path.write_text(f"{HEADLINES[0]}\n\n   \n{long_text}\n{HEADLINES[1]}\n", encoding="utf-8")
    code, out, err = run_cli(
        ["predict", "--model", str(model_dir), "--json", "-f", str(path)], capsys
    )
    assert code == 0
    texts = [HEADLINES[0], long_text, HEADLINES[1]]
    assert [row["label"] for row in json_lines(out)] == expected_labels(model_dir, texts)
    assert "skipped 2 empty line(s)" in err and "line 2, 3" in err
    assert f"longer than {MAX_LENGTH} tokens were truncated: line 4" in err


def test_parquet_and_csv_files(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parquet = tmp_path / "news.parquet"
    pl.DataFrame({"id": ["a", "b", "c", "d"], "text": [*HEADLINES, None]}).write_parquet(parquet)
    code, out, err = run_cli(
        ["predict", "--model", str(model_dir), "--json", "-f", str(parquet)], capsys
    )
    assert code == 0
    from_parquet = json_lines(out)
    assert [row["label"] for row in from_parquet] == expected_labels(model_dir, HEADLINES)
    assert "skipped 1 empty row(s)" in err and "row 4" in err

    csv_file = tmp_path / "news.csv"
    pl.DataFrame({"text": HEADLINES, "source": ["x"] * 3}).write_csv(csv_file)
    code, out, _ = run_cli(
        ["predict", "--model", str(model_dir), "--json", "-f", str(csv_file)], capsys
    )
    assert code == 0
    from_csv = json_lines(out)
    for a, b in zip(from_parquet, from_csv, strict=True):
        np.testing.assert_allclose(list(a["scores"].values()), list(b["scores"].values()), 1e-6)


@pytest.mark.kernels
def test_fp32_and_int8_both_selectable(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for precision in ("fp32", "int8"):
        code, out, _ = run_cli(
            ["predict", "--model", str(model_dir), "--json", "--precision", precision, "x y"],
            capsys,
        )
        assert code == 0 and len(json_lines(out)) == 1
    assert OnnxClassifier(model_dir).precision == "int8"  # auto on a CPU


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        (b"", ".txt", "no texts to classify"),
        (b"\n  \n\n", ".txt", "no texts to classify"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", ".txt", "binary data"),
        (
            "Caf\xe9 news\nGood news\n".encode("latin-1"),
            ".txt",
            "not UTF-8 text (byte 0xe9 at offset 3, line 1)",
        ),
        (b"title,body\nx,y\n", ".csv", "`text` column; its columns are ['title', 'body']"),
        (b"not parquet at all", ".parquet", "not a readable Parquet file"),
    ],
)
def test_bad_input_files(
    model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: bytes,
    suffix: str,
    message: str,
) -> None:
    path = tmp_path / f"input{suffix}"
    path.write_bytes(content)
    code, out, err = run_cli(["predict", "--model", str(model_dir), "-f", str(path)], capsys)
    assert code == 1
    assert out == ""
    assert message in err and str(path) in err


def test_missing_model_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["predict", "--model", str(tmp_path / "nowhere"), "a text"], capsys)
    assert code == 1
    assert "no exported model here" in err and "nowhere" in err


def test_an_argument_that_is_not_utf8_is_named(model_dir: Path) -> None:
    """`newsclf predict "$(printf 'abc \\xff')"`: the shell hands over a byte that is not UTF-8."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "newsclf.cli",
            "predict",
            "--model",
            str(model_dir),
            "ok",
            b"abc \xff",
        ],
        capture_output=True,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.decode().strip() == (
        "newsclf: error: argument 2: not UTF-8 text (byte 0xff at character 4); check the "
        "shell's locale or pass the text in a UTF-8 file with --file"
    )
    assert done.stdout == b""


def test_corrupt_model_file(model_dir: Path, tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in model_dir.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    (broken / "model.int8.onnx").write_bytes(b"garbage")
    code, _, err = run_cli(["predict", "--model", str(broken), "a text"], capsys)
    assert code == 1
    assert "ONNX Runtime cannot load it" in err


def test_missing_input_file(model_dir: Path, tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(
        ["predict", "--model", str(model_dir), "-f", str(tmp_path / "no")], capsys
    )
    assert code == 1 and "no such file" in err
    code, _, err = run_cli(["predict", "--model", str(model_dir), "-f", str(tmp_path)], capsys)
    assert code == 1 and f"{tmp_path}: a folder, not a file" in err


def test_a_decode_error_after_output_says_where_the_output_ends(model_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "newsclf.cli", "predict", "--model", str(model_dir), "--json"],
        input="\n".join([*HEADLINES[:2], "Caf\xe9 news", HEADLINES[2]]).encode("latin-1"),
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert [row["line"] for row in json_lines(result.stdout.decode())] == [1, 2]
    offset = len(HEADLINES[0]) + len(HEADLINES[1]) + 2 + len("Caf")
    expected = (
        f"stdin: not UTF-8 text (byte 0xe9 at offset {offset}, line 3); the output above ends "
        "at line 2, nothing after it was classified"
    )
    assert result.stderr.decode().strip().endswith(expected)


def test_a_csv_field_over_pythons_csv_limit_is_scored(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "long.csv"
    long_text = "markets " * 20_000  # 160,000 characters, over csv's 131,072
    pl.DataFrame({"text": [HEADLINES[0], long_text]}).write_csv(path)
    code, out, err = run_cli(
        ["predict", "--model", str(model_dir), "--json", "-f", str(path)], capsys
    )
    assert code == 0, err
    assert [row["row"] for row in json_lines(out)] == [1, 2]
    assert "truncated: row 2" in err


def test_large_file_is_batched_with_progress(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    from newsclf import cli

    monkeypatch.setattr(cli, "PROGRESS_DELAY_S", 0)
    texts = [f"{HEADLINES[i % 3]} number {i}" for i in range(1200)]
    path = tmp_path / "many.txt"
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    code, out, err = run_cli(
        ["predict", "--model", str(model_dir), "--json", "--batch-size", "50", "-f", str(path)],
        capsys,
    )
    assert code == 0
    rows = json_lines(out)
    assert len(rows) == 1200
    assert "classifying" in err and "1200/1200" in err
    sample = [0, 1, 599, 1199]  # order kept although batches are formed by length
    assert [rows[i]["label"] for i in sample] == expected_labels(
        model_dir, [texts[i] for i in sample]
    )


def test_numbers_and_ids_join_results_back_to_inputs(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Empty lines are skipped, and each result still names the line it came from.
    path = tmp_path / "texts.txt"
    path.write_text(f"\n{HEADLINES[0]}\n\n{HEADLINES[1]}\r\n   \n{HEADLINES[2]}", encoding="utf-8")
    code, out, err = run_cli(
        ["predict", "--model", str(model_dir), "--json", "--batch-size", "1", "-f", str(path)],
        capsys,
    )
    assert code == 0
    rows = json_lines(out)
    assert [row["line"] for row in rows] == [2, 4, 6]
    assert [row["label"] for row in rows] == expected_labels(model_dir, HEADLINES)
    assert "skipped 3 empty line(s)" in err and "line 1, 3, 5" in err

    # Tables: row numbers count data rows (header excluded), and an `id` column comes along.
    frame = pl.DataFrame({"id": [10, 11, 12, 13], "text": [HEADLINES[0], "", *HEADLINES[1:]]})
    for table in (tmp_path / "news.csv", tmp_path / "news.parquet"):
        frame.write_csv(table) if table.suffix == ".csv" else frame.write_parquet(table)
        code, out, _ = run_cli(
            ["predict", "--model", str(model_dir), "--json", "-f", str(table)], capsys
        )
        assert code == 0
        rows = json_lines(out)
        assert [(row["row"], row["id"]) for row in rows] == [(1, "10"), (3, "12"), (4, "13")]


def test_results_stream_out_before_the_input_ends(model_dir: Path) -> None:
    """stdin fed in two parts: the first part's results arrive while the second is not sent yet."""
    import queue
    import threading

    proc = subprocess.Popen(
        [sys.executable, "-m", "newsclf.cli", "predict", "--model", str(model_dir), "--json"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        proc.stdin.write(f"{HEADLINES[0]}\n\n{HEADLINES[1]}\n")
        proc.stdin.flush()
        # Raises queue.Empty if nothing comes while stdin stays open.
        first = [json.loads(lines.get(timeout=60)) for _ in range(2)]
        assert [row["line"] for row in first] == [1, 3]
        proc.stdin.write(f"{HEADLINES[2]}\n")
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
        assert json.loads(lines.get(timeout=10))["line"] == 4
    finally:
        proc.kill()


def test_scores_are_divided_by_the_folders_temperature(model_dir: Path, tmp_path: Path) -> None:
    """A folder carrying a temperature gives softmax(logits / T); labels do not change."""
    import shutil

    calibrated = tmp_path / "calibrated"
    shutil.copytree(model_dir, calibrated)
    meta_path = calibrated / "newsclf_onnx.json"
    meta = json.loads(meta_path.read_text())
    meta["calibration"] = {"temperature": 2.5, "fitted": True}
    meta_path.write_text(json.dumps(meta))
    raw, scaled = OnnxClassifier(model_dir), OnnxClassifier(calibrated)
    assert (raw.temperature, scaled.temperature, scaled.calibrated) == (1.0, 2.5, True)
    logits = raw.logits(raw.encode(HEADLINES).ids)
    expected = np.exp(logits / 2.5) / np.exp(logits / 2.5).sum(axis=1, keepdims=True)
    for pred, row, raw_pred in zip(
        scaled.predictions(logits), expected, raw.predictions(logits), strict=True
    ):
        assert list(pred.scores.values()) == pytest.approx(row.tolist(), abs=1e-6)
        assert pred.label == raw_pred.label
    for corrupt in (0, None, "2", float("inf"), 1e-300, 1e6):
        meta["calibration"]["temperature"] = corrupt
        meta_path.write_text(json.dumps(meta))
        with pytest.raises(PredictError, match="calibration.temperature .* is not a number from"):
            OnnxClassifier(calibrated)


def test_the_temperature_range_is_the_one_evaluate_fits_in() -> None:
    from newsclf.predict import TEMPERATURE_RANGE
    from stages.calibration import T_MAX, T_MIN

    assert TEMPERATURE_RANGE == (T_MIN, T_MAX)


def test_min_confidence_leaves_unsure_texts_without_a_label(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    classifier = OnnxClassifier(model_dir)
    preds = classifier.predictions(classifier.logits(classifier.encode(HEADLINES).ids))
    top = sorted(p.scores[p.label] for p in preds)
    # A threshold between the least and the most confident text: some answered, some not.
    threshold = (top[0] + top[-1]) / 2
    args = ["predict", "--model", str(model_dir), "--json", "--min-confidence", str(threshold)]
    code, out, err = run_cli([*args, *HEADLINES], capsys)
    assert code == 0
    rows = json_lines(out)
    unsure = [row["argument"] for row in rows if row["label"] is None]
    assert unsure == [i + 1 for i, p in enumerate(preds) if p.scores[p.label] < threshold]
    assert 0 < len(unsure) < len(rows)
    for row, pred in zip(rows, preds, strict=True):
        assert row["top_label"] == pred.label  # the model's answer, given either way
    assert f"{len(unsure)} text(s) scored below --min-confidence" in err
    code, out, _ = run_cli(
        ["predict", "--model", str(model_dir), "--min-confidence", "1", *HEADLINES], capsys
    )
    assert code == 0 and all(line.split()[1] == "-" for line in out.splitlines()[1:])
    code, _, err = run_cli(
        ["predict", "--model", str(model_dir), "--min-confidence", "1.5", "x"], capsys
    )
    assert code == 1 and "min confidence 1.5: expected a number from 0 to 1" in err
