"""`newsclf serve` on the tiny exported model: endpoints and limits in process (Starlette's test
client), and on a real uvicorn server on 127.0.0.1: concurrent requests each get their own answers,
a client that leaves breaks nothing, and a shutdown finishes the requests in flight."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient

from newsclf.predict import OnnxClassifier
from newsclf.serve import Limits, MicroBatcher, ServeConfig, TextFault, create_app
from tests.conftest import EXPORT_MAX_LENGTH

TEXTS = [
    "Stocks rally as the central bank holds interest rates steady",
    "Home side wins the cup final in extra time",
    "New probe reaches the outer planets",
    "Leaders meet for peace talks in Geneva",
    "Chip maker unveils a faster processor",
    "Striker scores twice as the league leaders win again",
]
LIMITS = Limits(max_texts=8, max_chars=400, max_body_bytes=4_000)


@pytest.fixture(scope="module")
def model_dir(tiny_onnx) -> Path:
    return tiny_onnx[0]


def offline(model_dir: Path, texts: list[str], precision: str = "auto") -> list[dict]:
    """What `newsclf predict` computes for these texts: label and scores per text."""
    classifier = OnnxClassifier(model_dir, precision)
    preds = classifier.predictions(classifier.logits(classifier.encode(texts).ids))
    return [{"label": p.label, "scores": p.scores} for p in preds]


def same_answers(got: list[dict], expected: list[dict]) -> bool:
    """Labels equal and scores within float noise (batches of other lengths pad differently)."""
    return len(got) == len(expected) and all(
        g["label"] == e["label"]
        and all(abs(g["scores"][k] - v) < 1e-4 for k, v in e["scores"].items())
        for g, e in zip(got, expected, strict=True)
    )


@contextlib.contextmanager
def loaded_client(model_dir: Path, precision: str) -> Iterator[TestClient]:
    """The app in process, once its model has loaded."""
    config = ServeConfig(
        model_dir, precision, None, max_batch=16, max_wait_ms=2, ort_batch=8, limits=LIMITS
    )
    with TestClient(create_app(config)) as test_client:
        deadline = time.monotonic() + 60
        while test_client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.05)
        yield test_client


@pytest.fixture(scope="module")
def client(model_dir: Path) -> Iterator[TestClient]:
    with loaded_client(model_dir, "auto") as test_client:
        yield test_client


def test_predict_answers_in_request_order_as_predict_does(model_dir: Path, client) -> None:
    response = client.post("/predict", json={"texts": TEXTS[:3]})
    assert response.status_code == 200
    predictions = response.json()["predictions"]
    assert [p["index"] for p in predictions] == [0, 1, 2]
    assert same_answers(predictions, offline(model_dir, TEXTS[:3]))
    assert all(sum(p["scores"].values()) == pytest.approx(1.0) for p in predictions)
    assert not any(p["truncated"] for p in predictions)


def test_health_and_metadata(model_dir: Path, client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    meta = client.get("/metadata").json()
    classifier = OnnxClassifier(model_dir)
    assert meta["labels"] == classifier.labels
    assert meta["precision"] == classifier.precision
    assert meta["max_length"] == EXPORT_MAX_LENGTH
    model_file = model_dir / meta["model_file"]
    assert meta["model_sha256"] == hashlib.sha256(model_file.read_bytes()).hexdigest()


def test_a_text_over_max_length_is_truncated_and_says_so(model_dir: Path, client) -> None:
    long_text = "markets " * 45  # over the tiny model's 32 tokens, under max_chars
    predictions = client.post("/predict", json={"texts": [TEXTS[0], long_text]}).json()
    assert [p["truncated"] for p in predictions["predictions"]] == [False, True]
    assert same_answers(predictions["predictions"], offline(model_dir, [TEXTS[0], long_text]))


@pytest.mark.parametrize(
    ("body", "status", "says", "limit"),
    [
        (b"{not json", 400, "the body is not valid JSON", None),
        (b'["a"]', 422, 'expected a JSON object {"texts": [...]}', None),
        (b'{"texts": "one text"}', 422, "`texts` must be a list of strings, got str", None),
        (b'{"texts": []}', 422, "`texts` is empty", None),
        (b'{"texts": ["ok", 3]}', 422, "texts[1] must be a string, got int", None),
        (b'{"texts": ["ok", "  "]}', 422, "texts[1] is empty", None),
        (
            b'{"texts": ["ok", "abc \\ud800 def"]}',
            422,
            "texts[1] is not valid Unicode: '\\ud800' at character 4 is a lone UTF-16 surrogate",
            None,
        ),
        (
            json.dumps({"texts": ["x"] * 9}).encode(),
            413,
            "9 texts in one request, over the limit of 8",
            "max_texts=8",
        ),
        (
            json.dumps({"texts": ["ok", "y" * 401]}).encode(),
            413,
            "texts[1] has 401 characters, over the limit of 400",
            "max_chars=400",
        ),
        (
            json.dumps({"texts": ["z" * 399] * 11}).encode(),
            413,
            "request body over the limit of 4000 bytes",
            "max_body_bytes=4000",
        ),
    ],
)
def test_bad_requests_get_a_4xx_that_names_the_fault(
    client, body: bytes, status: int, says: str, limit: str | None
) -> None:
    response = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert says in response.json()["error"]
    assert response.json().get("limit") == limit


class Refusing(OnnxClassifier):
    """The tiny model, whose tokenizer refuses texts with TOKENIZER_FAULT and whose graph refuses
    those with GRAPH_FAULT (as ONNX Runtime does an input it cannot run); `broken`: every call."""

    TOKENIZER_FAULT, GRAPH_FAULT = "tokenizer-refuses-me", "graph-refuses-me"
    GRAPH_FAULT_LENGTH = 27  # token count of GRAPH_FAULT_TEXT, which no other text here has
    broken = False

    def encode(self, texts):
        if self.broken or any(self.TOKENIZER_FAULT in text for text in texts):
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[...]]")
        return super().encode(texts)

    def logits(self, ids, batch_size=64, on_batch=None, by_length=True):
        if any(len(seq) == self.GRAPH_FAULT_LENGTH for seq in ids):
            raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions")
        return super().logits(ids, batch_size, on_batch, by_length)


GRAPH_FAULT_TEXT = " ".join(["graph-refuses-me"] + ["word"] * 20)


def test_a_text_that_fails_fails_only_its_own_request(model_dir: Path) -> None:
    """Good requests waiting beside texts the tokenizer or the graph refuses get their answers;
    each refused text fails its own request with a TextFault (a 422); a model that fails on every
    text fails them all with its own error (a 500)."""
    import asyncio

    classifier = Refusing(model_dir, "fp32")
    assert len(classifier.encode([GRAPH_FAULT_TEXT]).ids[0]) == Refusing.GRAPH_FAULT_LENGTH
    assert all(len(ids) != Refusing.GRAPH_FAULT_LENGTH for ids in classifier.encode(TEXTS).ids)
    expected = offline(model_dir, TEXTS, "fp32")

    async def requests(batcher: MicroBatcher, bodies: list[list[str]]) -> list[list]:
        runner = asyncio.create_task(batcher.run())
        try:
            return await asyncio.gather(*(batcher.score(body) for body in bodies))
        finally:
            runner.cancel()

    bad = [f"a {Refusing.TOKENIZER_FAULT} text", GRAPH_FAULT_TEXT]
    bodies = [[TEXTS[i % 6], TEXTS[(i + 1) % 6]] for i in range(10)] + [
        [TEXTS[0], bad[0]],
        [bad[1]],
    ]
    batcher = MicroBatcher(classifier, max_batch=64, max_wait_s=0.2, ort_batch=4)
    answers = asyncio.run(requests(batcher, bodies))
    for body, answer in zip(bodies[:10], answers[:10], strict=True):
        got = classifier.predictions(np.stack([scored.logits for scored in answer]))
        want = [expected[TEXTS.index(text)] for text in body]
        assert same_answers([{"label": p.label, "scores": p.scores} for p in got], want)
    assert not isinstance(answers[10][0], Exception)  # the good text beside a bad one
    assert isinstance(answers[10][1], TextFault) and "TypeError" in str(answers[10][1])
    assert isinstance(answers[11][0], TextFault) and "INVALID_ARGUMENT" in str(answers[11][0])

    Refusing.broken = True
    try:
        broken = MicroBatcher(classifier, max_batch=64, max_wait_s=0.2, ort_batch=4)
        answers = asyncio.run(requests(broken, [[TEXTS[0]], [TEXTS[1], TEXTS[2]]]))
    finally:
        Refusing.broken = False
    faults = [result for answer in answers for result in answer]
    assert all(isinstance(f, TypeError) and not isinstance(f, TextFault) for f in faults)


def test_the_refused_text_is_named_in_a_422(model_dir: Path, monkeypatch) -> None:
    from newsclf import serve

    monkeypatch.setattr(serve, "OnnxClassifier", Refusing)
    with loaded_client(model_dir, "fp32") as test_client:
        response = test_client.post("/predict", json={"texts": [TEXTS[0], GRAPH_FAULT_TEXT]})
        assert response.status_code == 422
        error = response.json()["error"]
        assert error.startswith("texts[1] cannot be scored: RuntimeError: [ONNXRuntimeError]")
        assert error.endswith(f"the text: {GRAPH_FAULT_TEXT[:40]!r}")
        assert test_client.post("/predict", json={"texts": TEXTS[:2]}).status_code == 200


def test_a_model_that_loads_but_cannot_score_is_reported_not_served(model_dir: Path, monkeypatch):
    """The probe text fails: /health says `failed` with the file and the fault (never 200), and
    the server is told to stop."""
    from newsclf import serve

    monkeypatch.setattr(serve, "OnnxClassifier", Refusing)
    monkeypatch.setattr(Refusing, "broken", True)
    stopped: list[str] = []
    config = ServeConfig(
        model_dir, "fp32", None, max_batch=16, max_wait_ms=2, ort_batch=8, limits=LIMITS
    )
    with TestClient(create_app(config, on_load_failure=stopped.append)) as test_client:
        deadline = time.monotonic() + 60
        while not stopped:
            assert time.monotonic() < deadline, "the load did not end"
            time.sleep(0.05)
        health = test_client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert health.json()["error"].startswith(
            f"{model_dir / 'model.onnx'}: loads but cannot score"
        )
        assert test_client.post("/predict", json={"texts": ["a text"]}).status_code == 503
    assert stopped == [health.json()["error"]]


# ---- a real server --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, payload, {"content-type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def start_server(model_dir: Path, port: int, *options: str) -> subprocess.Popen:
    command = ["serve", "--model", str(model_dir), "--port", str(port), *options]
    server = subprocess.Popen(
        [sys.executable, "-m", "newsclf.cli", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            if request(port, "GET", "/health")[0] == 200:
                return server
        except OSError:
            pass
        assert server.poll() is None, server.stdout.read().decode()
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.1)


def stop(server: subprocess.Popen) -> str:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
    out, _ = server.communicate(timeout=60)
    return out.decode()


def test_concurrent_requests_get_their_own_answers_and_a_leaving_client_breaks_nothing(
    model_dir: Path,
) -> None:
    port = free_port()
    # fp32: dynamic int8 scales activations per batch, so int8 scores move with batch-mates.
    server = start_server(
        model_dir, port, "--precision", "fp32", "--max-wait-ms", "20", "--max-batch", "32"
    )
    try:
        # 48 requests from 16 threads, each with its own rotation of the texts.
        bodies = [[TEXTS[(i + k) % len(TEXTS)] for k in range(1 + i % 3)] for i in range(48)]
        expected = dict(zip(TEXTS, offline(model_dir, TEXTS, "fp32"), strict=True))
        with ThreadPoolExecutor(16) as pool:
            answers = list(
                pool.map(lambda b: request(port, "POST", "/predict", {"texts": b}), bodies)
            )
        for body, (status, answer) in zip(bodies, answers, strict=True):
            assert status == 200
            assert same_answers(answer["predictions"], [expected[t] for t in body])
        batches = request(port, "GET", "/metadata")[1]["batches_scored"]
        assert batches < len(bodies)  # texts of concurrent requests were scored together

        # Clients that leave: one mid-body, one before reading its answer.
        for payload in (b'{"texts": ["half', json.dumps({"texts": TEXTS}).encode()):
            with socket.create_connection(("127.0.0.1", port)) as raw:
                head = (
                    "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(payload) + 100}\r\n\r\n"
                )
                raw.sendall(head.encode() + payload)
        status, answer = request(port, "POST", "/predict", {"texts": TEXTS[:2]})
        assert status == 200
        assert same_answers(answer["predictions"], offline(model_dir, TEXTS[:2], "fp32"))
    finally:
        log = stop(server)
    assert "Exception in ASGI application" not in log
    assert "Application shutdown complete" in log  # uvicorn then re-raises the SIGTERM
    assert "Uvicorn running on http://127.0.0.1:" in log  # loopback by default


def test_a_model_that_cannot_load_stops_the_server_naming_the_file(
    model_dir: Path, tmp_path: Path
) -> None:
    """A truncated graph: the server logs the file and ONNX Runtime's fault and exits 1, instead
    of answering /health "loading" for ever."""
    import shutil

    broken = tmp_path / "onnx"
    shutil.copytree(model_dir, broken)
    for graph in broken.glob("*.onnx"):
        graph.write_bytes(graph.read_bytes()[:5000])
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "newsclf.cli", "serve", "--model", str(broken), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    try:
        out, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
    log = out.decode()
    assert server.returncode == 1, log
    assert f"the model could not be loaded: {broken}/model" in log
    assert "ONNX Runtime cannot load it" in log


def test_a_stalled_body_is_answered_408(model_dir: Path) -> None:
    port = free_port()
    server = start_server(model_dir, port, "--body-timeout-s", "1")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
            raw.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"texts": ["half'
            )
            started = time.monotonic()
            reply = b""
            while b"}" not in reply and (chunk := raw.recv(4096)):
                reply += chunk
            waited = time.monotonic() - started
            reply = reply.decode()
        assert reply.startswith("HTTP/1.1 408"), reply
        assert "request body not received within 1 s" in reply and "body_timeout_s=1" in reply
        assert waited < 10
        status, answer = request(port, "POST", "/predict", {"texts": TEXTS[:2]})
        assert status == 200
    finally:
        log = stop(server)
    assert "Traceback" not in log


def test_shutdown_finishes_the_requests_in_flight(model_dir: Path) -> None:
    port = free_port()
    # A long batching wait holds the request in the server when the signal arrives.
    server = start_server(model_dir, port, "--max-wait-ms", "1500", "--max-batch", "64")
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(request, port, "POST", "/predict", {"texts": TEXTS[:2]})
        time.sleep(0.5)
        server.send_signal(signal.SIGTERM)
        status, answer = pending.result(timeout=30)
    log = stop(server)
    assert status == 200, log
    assert same_answers(answer["predictions"], offline(model_dir, TEXTS[:2]))
    assert "Application shutdown complete" in log


def metric_samples(client) -> dict[tuple[str, tuple], float]:
    """GET /metrics parsed by prometheus_client's own parser: {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def test_min_confidence_and_the_metrics_that_count_requests(model_dir: Path) -> None:
    """A fresh app: /metrics counts requests by status, texts, batches, predictions by label and
    abstentions, and names the model file's hash; `min_confidence` leaves unsure texts unlabelled."""
    with loaded_client(model_dir, "auto") as fresh:
        scores = [
            max(p["scores"].values())
            for p in fresh.post("/predict", json={"texts": TEXTS}).json()["predictions"]
        ]
        threshold = (min(scores) + max(scores)) / 2
        answer = fresh.post("/predict", json={"texts": TEXTS, "min_confidence": threshold}).json()
        unsure = [p["index"] for p in answer["predictions"] if p["label"] is None]
        assert unsure == [i for i, s in enumerate(scores) if s < threshold] and unsure
        assert all(p["top_label"] for p in answer["predictions"])
        bad = fresh.post("/predict", json={"texts": TEXTS[:2], "min_confidence": 2})
        assert bad.status_code == 422 and bad.json()["limit"] == "min_confidence in [0, 1]"
        assert fresh.post("/predict", json={"texts": []}).status_code == 422
        samples = metric_samples(fresh)
        sha = fresh.get("/metadata").json()["model_sha256"]
    n = len(TEXTS)
    assert samples[("newsclf_requests_total", (("status", "200"),))] == 2
    assert samples[("newsclf_requests_total", (("status", "422"),))] == 2
    assert samples[("newsclf_texts_total", (("status", "answered"),))] == 2 * n
    assert samples[("newsclf_texts_total", (("status", "rejected"),))] == 2
    predicted = sum(v for (name, _), v in samples.items() if name == "newsclf_predictions_total")
    assert predicted == 2 * n
    assert samples[("newsclf_abstentions_total", ())] == len(unsure)
    assert samples[("newsclf_request_latency_seconds_count", ())] == 4
    assert samples[("newsclf_batch_texts_sum", ())] == 2 * n
    info = [labels for (name, labels) in samples if name == "newsclf_model_info"]
    assert dict(info[0])["model_sha256"] == sha


def test_log_writes_every_scored_text_to_parquet(model_dir: Path, tmp_path: Path) -> None:
    """`--log DIR`: each answered text, its labels and scores, in Parquet files written when the
    app stops (and every `rows_per_file` texts); refused requests are not logged."""
    import polars as pl
    import pyarrow.parquet as pq

    from newsclf.serve import TextLogConfig
    from newsclf.textlog import LABELS_KEY, log_files

    config = ServeConfig(
        model_dir,
        "auto",
        None,
        max_batch=16,
        max_wait_ms=2,
        ort_batch=8,
        limits=LIMITS,
        log=TextLogConfig(tmp_path / "log", max_bytes=10**7, rows_per_file=4),
    )
    with TestClient(create_app(config)) as logged:
        deadline = time.monotonic() + 60
        while logged.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.05)
        first = logged.post("/predict", json={"texts": TEXTS}).json()["predictions"]
        second = logged.post("/predict", json={"texts": TEXTS[:1], "min_confidence": 1.0}).json()
        assert logged.post("/predict", json={"texts": ["ok", ""]}).status_code == 422
        sha = logged.get("/metadata").json()["model_sha256"]
    files = log_files(tmp_path / "log")
    # 7 texts, at most 4 a file (a file of 4 when the buffer filled, the rest at shutdown).
    assert 2 <= len(files) <= 3
    assert all(pl.scan_parquet(f).select(pl.len()).collect().item() <= 4 for f in files)
    rows = pl.read_parquet(files).sort("time", maintain_order=True)
    assert rows["text"].to_list() == [*TEXTS, TEXTS[0]]
    assert rows["label"].to_list() == [p["label"] for p in first] + [None]
    assert rows["top_label"].to_list()[-1] == second["predictions"][0]["top_label"]
    assert rows["model_sha256"].unique().to_list() == [sha]
    labels = json.loads(pq.read_schema(files[0]).metadata[LABELS_KEY])
    assert [dict(zip(labels, s, strict=True)) for s in rows["scores"].to_list()[:1]][0] == (
        pytest.approx(first[0]["scores"], abs=1e-6)
    )
    assert not list((tmp_path / "log").glob(".*partial"))


def test_text_log_rotates_and_keeps_disk_use_bounded(tmp_path: Path) -> None:
    from newsclf.textlog import LogRow, TextLog, log_files, now_utc

    log = TextLog(tmp_path, ["a", "b"], rows_per_file=10, flush_s=3600, max_bytes=1)
    rows = [
        LogRow(now_utc(), f"text {i}", "a", "a", 0.9, [0.9, 0.1], "sha", False) for i in range(35)
    ]
    log.append(rows)
    log.close()
    # 4 files written (10, 10, 10, 5 rows); over max_bytes, all but the newest deleted.
    assert (log.files_written, log.files_deleted) == (4, 3)
    (newest,) = log_files(tmp_path)
    import polars as pl

    assert pl.read_parquet(newest)["text"].to_list() == [f"text {i}" for i in range(30, 35)]
    with pytest.raises(RuntimeError, match="closed"):
        log.append(rows[:1])


def test_a_failed_log_write_keeps_its_rows_and_is_retried(tmp_path: Path, monkeypatch) -> None:
    """A folder gone mid-run (or a full disk): the write fails, is counted, its rows are kept,
    and once the folder is back the next try writes them all; nothing is lost."""
    import shutil

    import polars as pl

    from newsclf import textlog

    monkeypatch.setattr(textlog, "RETRY_S", 0.05)
    folder = tmp_path / "log"
    log = textlog.TextLog(folder, ["a", "b"], rows_per_file=5, flush_s=3600, max_bytes=10**7)
    shutil.rmtree(folder)
    rows = [
        textlog.LogRow(textlog.now_utc(), f"text {i}", "a", "a", 0.9, [0.9, 0.1], "sha", False)
        for i in range(12)
    ]
    log.append(rows)  # 12 rows: two full files due, and the folder is gone
    deadline = time.monotonic() + 10
    while log.write_errors == 0:
        assert time.monotonic() < deadline, "the failed write was not counted"
        time.sleep(0.01)
    folder.mkdir()
    assert log.close() == 0  # the retry, then the rest at close
    written = pl.read_parquet(textlog.log_files(folder))["text"].to_list()
    assert sorted(written) == sorted(r.text for r in rows)
    assert log.rows_dropped == 0


def test_serve_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys, newsclf.cli, newsclf.serve, newsclf.textlog; "
        "newsclf.serve.ServiceMetrics(); "
        "heavy = {'torch', 'transformers', 'polars', 'sklearn'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
