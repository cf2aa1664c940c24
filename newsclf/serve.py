"""`newsclf serve`: the exported ONNX model over HTTP, an ASGI app (Starlette) on uvicorn.

- `POST /predict` `{"texts": [...]}` -> `{"predictions": [{"index", "label", "scores", "truncated"},
  ...]}` in the request's order.
- `GET /health`: 200 once the model is loaded, 503 while it loads (the server accepts connections
  from the start, so a load balancer can tell "starting" from "down").
- `GET /metadata`: labels, base model, precision, max length, the served model file and its
  SHA-256, the calibration temperature, and the test accuracy the export stage measured for each
  graph.
- `GET /metrics`: Prometheus' text format: requests by status, texts by outcome, latency and
  batch-size histograms, predictions by label, abstentions, and the model file's hash.

Scores are calibrated (softmax of logits / the temperature in `newsclf_onnx.json`). A request may
carry `"min_confidence": P` (0-1): a text whose top score is below P gets `"label": null` (its
scores and `top_label` still given), for a person to decide. With `--log DIR` every scored text is
appended to rotating Parquet files (newsclf/textlog.py) for `newsclf monitor`.

Texts of concurrent requests are scored together: a micro-batcher collects them until `max_batch`
texts are waiting or `max_wait_ms` have passed since the first, then tokenizes them at once and
scores them off the event loop in ONNX Runtime calls of `ort_batch` texts grouped by length (as
`predict` does), so throughput under concurrency approaches that of offline batches. Each text
carries its own future, so an answer can never reach another request, and a client that leaves
only drops its own. A batch that fails is scored again text by text, so a text the tokenizer or
the graph refuses fails its own request (a 422 naming it) and no other. Limits answer with a 4xx
that names the limit. The model is loaded and scores a probe text before /health turns ready; a
model that cannot do that stops the server with the file and the fault in its log and a non-zero
exit. Like `newsclf predict`, this imports neither torch nor transformers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from newsclf.predict import OnnxClassifier, PredictError, check_min_confidence, read_meta
from newsclf.textlog import LogRow, TextLog, now_utc

MAX_SHOWN_CHARS = 40  # of a refused text, in an error
CLIENT_CLOSED_REQUEST = 499  # logged for a client gone mid-body (nginx's code; never sent)
# Scored once at load (the model must answer it before /health turns ready), and again when a
# text fails alone: if the probe still scores, the fault is the text's.
PROBE_TEXT = "newsclf probe: the model loads and scores this text."

log = logging.getLogger("newsclf.serve")


class TextFault(Exception):
    """A text that failed when scored alone while the model scores other texts: its own fault."""


@dataclass(frozen=True)
class Limits:
    """What one request may hold; over a limit, the answer is a 4xx that names it."""

    max_texts: int
    max_chars: int
    max_body_bytes: int
    body_timeout_s: float = 10.0  # from the headers to the body's last byte


@dataclass(frozen=True)
class TextLogConfig:
    """`--log`: where scored texts go, and the bounds on the files (newsclf/textlog.py)."""

    folder: Path
    max_bytes: int
    rows_per_file: int
    flush_s: float = 60.0


@dataclass(frozen=True)
class ServeConfig:
    model_dir: Path
    precision: str
    threads: int | None
    max_batch: int
    max_wait_ms: float
    ort_batch: int
    limits: Limits
    log: TextLogConfig | None = None


# Seconds: from a one-text request on an idle server (~5 ms) to a full request under load.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class TextLogCollector:
    """`--log`'s health for /metrics: failed writes and rows dropped (none without --log)."""

    def __init__(self) -> None:
        self.text_log: TextLog | None = None

    def describe(self) -> list:
        return []  # nothing to check at registration: the log opens once the model loads

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        if self.text_log is None:
            return
        yield CounterMetricFamily(
            "newsclf_log_write_errors",
            "--log: Parquet writes that failed (their rows are kept and tried again)",
            value=self.text_log.write_errors,
        )
        yield CounterMetricFamily(
            "newsclf_log_rows_dropped",
            "--log: rows dropped because writes kept failing and the buffer was full",
            value=self.text_log.rows_dropped,
        )


class ServiceMetrics:
    """What GET /metrics exposes, in a registry of the app's own (so apps in one process, as in
    tests, never share counters)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram, Info

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "newsclf_requests",
            "POST /predict requests by HTTP status",
            ["status"],
            registry=self.registry,
        )
        self.texts = Counter(
            "newsclf_texts",
            "Texts of /predict requests by outcome: answered (200), rejected (the request got a "
            "4xx), error (a 500)",
            ["status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "newsclf_request_latency_seconds",
            "POST /predict time from request to answer",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_texts = Histogram(
            "newsclf_batch_texts",
            "Texts per micro-batch scored together",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.predictions = Counter(
            "newsclf_predictions",
            "Texts answered, by top label",
            ["label"],
            registry=self.registry,
        )
        self.abstentions = Counter(
            "newsclf_abstentions",
            "Texts below their request's min_confidence (label null)",
            registry=self.registry,
        )
        self.model = Info("newsclf_model", "The model served", registry=self.registry)
        self.text_log = TextLogCollector()
        self.registry.register(self.text_log)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


@dataclass
class Waiting:
    """One text waiting to be scored, and the future its request awaits."""

    text: str
    future: asyncio.Future


@dataclass(frozen=True)
class Scored:
    logits: np.ndarray
    truncated: bool


def score(classifier: OnnxClassifier, texts: list[str], ort_batch: int) -> list[Scored]:
    """One micro-batch, tokenized in one go and scored in ONNX Runtime calls of `ort_batch` texts
    of similar length (runs in a worker thread). Texts of concurrent requests come in any length
    order: one call over all of them would pad each to the longest, about halving throughput."""
    encoded = classifier.encode(texts)
    for i, ids in enumerate(encoded.ids):
        if not ids:  # a graph cannot take an empty sequence (a tokenizer without special tokens)
            raise TextFault(
                "the tokenizer gives it no tokens" if len(texts) == 1 else f"text {i} has no tokens"
            )
    logits = classifier.logits(encoded.ids, ort_batch)
    return [Scored(row, cut) for row, cut in zip(logits, encoded.truncated, strict=True)]


def score_alone(classifier: OnnxClassifier, text: str) -> Scored | TextFault:
    """One text scored on its own after its batch failed while the model still scores the probe
    text: its result, or a TextFault (the fault is this text's)."""
    try:
        return score(classifier, [text], 1)[0]
    except TextFault as fault:
        return fault
    except Exception as err:
        return TextFault(f"{type(err).__name__}: {err}")


class MicroBatcher:
    """Groups texts from concurrent requests into ONNX Runtime batches."""

    def __init__(
        self,
        classifier: OnnxClassifier,
        max_batch: int,
        max_wait_s: float,
        ort_batch: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        """`on_batch(texts)` is called for each micro-batch scored (for /metrics)."""
        self.classifier, self.max_batch, self.max_wait_s = classifier, max_batch, max_wait_s
        self.ort_batch = ort_batch
        self.on_batch = on_batch
        self.queue: asyncio.Queue[Waiting] = asyncio.Queue()
        self.batches = 0  # ONNX Runtime calls made, for /metadata's stats

    async def score(self, texts: list[str]) -> list[Scored | Exception]:
        """These texts scored, in their order, once their batches have run; a text that failed
        has its exception in its place."""
        loop = asyncio.get_running_loop()
        waiting = [Waiting(text, loop.create_future()) for text in texts]
        for item in waiting:
            self.queue.put_nowait(item)
        return await asyncio.gather(*(item.future for item in waiting), return_exceptions=True)

    async def _collect(self) -> list[Waiting]:
        """The next batch: the first waiting text, then more until the batch is full or the wait
        since the first is over."""
        batch = [await self.queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except TimeoutError:  # asyncio.wait_for's timeout (asyncio.TimeoutError since 3.11)
                break
        return batch

    async def _score(self, batch: list[Waiting]) -> None:
        batch = [item for item in batch if not item.future.done()]
        if not batch:  # every request of these texts has gone
            return
        try:
            results = await asyncio.to_thread(
                score, self.classifier, [item.text for item in batch], self.ort_batch
            )
            self.batches += 1
            if self.on_batch is not None:
                self.on_batch(len(batch))
        except Exception as err:
            try:  # does the model still score a text? Then one text failed them all.
                await asyncio.to_thread(score, self.classifier, [PROBE_TEXT], 1)
            except Exception:  # the server's fault: every waiting request gets it (a 500)
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(err)
                return
            results = []
            for item in batch:  # each text on its own, for the requests still waiting
                done = item.future.done()
                results.append(
                    None
                    if done
                    else await asyncio.to_thread(score_alone, self.classifier, item.text)
                )
        for item, result in zip(batch, results, strict=True):
            if item.future.done():
                continue
            if isinstance(result, Exception):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)

    async def run(self) -> None:
        """One batch scores while the next is collected, so ONNX Runtime does not wait for the
        round trip of the requests it has just answered; one ONNX Runtime call at a time."""
        scoring: asyncio.Task | None = None
        try:
            while True:
                batch = await self._collect()
                if scoring is not None:
                    await scoring
                scoring = asyncio.create_task(self._score(batch))
        finally:
            if scoring is not None:
                scoring.cancel()


@dataclass
class Served:
    """What the app holds once the model is loaded."""

    classifier: OnnxClassifier
    batcher: MicroBatcher
    metadata: dict
    text_log: TextLog | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)


def refuse(status: int, message: str, limit: str | None = None) -> JSONResponse:
    body = {"error": message} | ({"limit": limit} if limit else {})
    return JSONResponse(body, status_code=status)


def load(config: ServeConfig) -> tuple[OnnxClassifier, dict]:
    """The classifier and what /metadata answers (model file hashed once, here)."""
    meta = read_meta(config.model_dir)
    classifier = OnnxClassifier(
        config.model_dir, config.precision, threads=config.threads, meta=meta
    )
    model_file = config.model_dir / meta["models"][classifier.precision]
    try:
        score(classifier, [PROBE_TEXT], 1)
    except Exception as err:
        raise PredictError(f"{model_file}: loads but cannot score a text ({err})") from err
    digest = hashlib.sha256()
    with model_file.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    metadata = {
        "labels": classifier.labels,
        "base_model": meta.get("base_model"),
        "precision": classifier.precision,
        "max_length": classifier.max_length,
        "model_file": model_file.name,
        "model_sha256": digest.hexdigest(),
        "test_accuracy": meta.get("test_accuracy", {}),
        "calibration": {"temperature": classifier.temperature, "fitted": classifier.calibrated},
        "notice": classifier.notice,
    }
    return classifier, metadata


def open_text_log(config: TextLogConfig, labels: list[str]) -> TextLog:
    try:
        return TextLog(
            config.folder,
            labels,
            rows_per_file=config.rows_per_file,
            flush_s=config.flush_s,
            max_bytes=config.max_bytes,
        )
    except OSError as err:
        raise PredictError(f"--log {config.folder}: cannot write there ({err})") from err


def log_rows(predictions: list, scored: list[Scored], texts: list[str], model_sha256: str):
    when = now_utc()
    return [
        LogRow(
            time=when,
            text=text,
            label=p.label,
            top_label=p.top_label,
            confidence=p.scores[p.top_label],
            scores=list(p.scores.values()),
            model_sha256=model_sha256,
            truncated=s.truncated,
        )
        for text, p, s in zip(texts, predictions, scored, strict=True)
    ]


def request_min_confidence(payload: dict) -> float | None | JSONResponse:
    """The request's `min_confidence` (None when absent), or the 422 that says what is wrong."""
    try:
        return check_min_confidence(payload.get("min_confidence"))
    except PredictError as err:
        return refuse(422, f"`min_confidence`: {err}", "min_confidence in [0, 1]")


def check_texts(payload: object, limits: Limits) -> list[str] | JSONResponse:
    """The texts of a parsed body, or the 4xx answer that says what is wrong with them."""
    if not isinstance(payload, dict) or "texts" not in payload:
        return refuse(422, 'expected a JSON object {"texts": [...]}')
    texts = payload["texts"]
    if not isinstance(texts, list):
        return refuse(422, f"`texts` must be a list of strings, got {type(texts).__name__}")
    if not texts:
        return refuse(422, "`texts` is empty: send one text or more")
    if len(texts) > limits.max_texts:
        return refuse(
            413,
            f"{len(texts)} texts in one request, over the limit of {limits.max_texts}",
            f"max_texts={limits.max_texts}",
        )
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            return refuse(422, f"texts[{i}] must be a string, got {type(text).__name__}")
        if not text.strip():
            return refuse(422, f"texts[{i}] is empty")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:  # JSON's \ud800 escapes decode to lone surrogates
            return refuse(
                422,
                f"texts[{i}] is not valid Unicode: {text[err.start]!r} at character {err.start} "
                "is a lone UTF-16 surrogate",
            )
        if len(text) > limits.max_chars:
            return refuse(
                413,
                f"texts[{i}] has {len(text)} characters, over the limit of {limits.max_chars} "
                f"({text[:MAX_SHOWN_CHARS]!r}...)",
                f"max_chars={limits.max_chars}",
            )
    return texts


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes | JSONResponse:
    """The request body, or a 413 as soon as it is known to be over `limit` bytes, or a 408 when
    it has not all arrived within `timeout_s` (a stalled client holds no connection for ever)."""
    too_big = refuse(
        413, f"request body over the limit of {limit} bytes", f"max_body_bytes={limit}"
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return too_big
    body = bytearray()
    chunks = request.stream()
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), max(remaining, 0))
        except StopAsyncIteration:
            return bytes(body)
        except TimeoutError:  # asyncio.wait_for's timeout (asyncio.TimeoutError since 3.11)
            return refuse(
                408,
                f"request body not received within {timeout_s:g} s ({len(body)} bytes came)",
                f"body_timeout_s={timeout_s:g}",
            )
        body += chunk
        if len(body) > limit:
            return too_big


def create_app(
    config: ServeConfig, on_load_failure: Callable[[str], None] | None = None
) -> Starlette:
    """The app; `on_load_failure(message)` is called when the model cannot be loaded (the
    server then stops: `serve`)."""
    state: dict[str, Served] = {}
    failed: dict[str, str] = {}
    metrics = ServiceMetrics()

    async def load_model() -> None:
        try:
            classifier, metadata = await asyncio.to_thread(load, config)
            text_log = (
                open_text_log(config.log, classifier.labels) if config.log is not None else None
            )
        except Exception as err:  # a corrupt or foreign file: say which, and stop
            message = str(err) if isinstance(err, PredictError) else f"{type(err).__name__}: {err}"
            failed["error"] = message
            log.error("newsclf serve: the model could not be loaded: %s", message)
            if on_load_failure is not None:
                on_load_failure(message)
            return
        batcher = MicroBatcher(
            classifier,
            config.max_batch,
            config.max_wait_ms / 1000,
            config.ort_batch,
            on_batch=metrics.batch_texts.observe,
        )
        metrics.model.info(
            {
                "model_sha256": metadata["model_sha256"],
                "model_file": metadata["model_file"],
                "precision": metadata["precision"],
            }
        )
        metrics.text_log.text_log = text_log
        served = Served(classifier, batcher, metadata, text_log)
        served.tasks.append(asyncio.create_task(batcher.run()))
        state["served"] = served

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loading = asyncio.create_task(load_model())
        yield
        # uvicorn has finished the requests in flight by now (graceful shutdown).
        loading.cancel()
        for task in state["served"].tasks if "served" in state else []:
            task.cancel()
        if "served" in state and state["served"].text_log is not None:
            await asyncio.to_thread(state["served"].text_log.close)  # what is buffered, written

    def not_ready() -> JSONResponse:
        if failed:
            return JSONResponse({"status": "failed", "error": failed["error"]}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    async def health(request: Request) -> JSONResponse:
        if "served" not in state:
            return not_ready()
        return JSONResponse({"status": "ok"})

    async def metadata(request: Request) -> JSONResponse:
        if "served" not in state:
            return not_ready()
        served = state["served"]
        return JSONResponse(served.metadata | {"batches_scored": served.batcher.batches})

    async def metrics_endpoint(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def predict(request: Request) -> Response:
        """`answer`, counted and timed for /metrics."""
        start = time.perf_counter()
        try:
            response = await answer(request)
        except Exception:
            metrics.requests.labels("500").inc()
            metrics.latency.observe(time.perf_counter() - start)
            raise
        metrics.requests.labels(str(response.status_code)).inc()
        metrics.latency.observe(time.perf_counter() - start)
        return response

    async def answer(request: Request) -> Response:
        if "served" not in state:
            return not_ready()
        served = state["served"]
        try:
            body = await read_body(
                request, config.limits.max_body_bytes, config.limits.body_timeout_s
            )
        except ClientDisconnect:  # gone mid-body: nothing to answer, nothing else affected
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        if isinstance(body, JSONResponse):
            return body
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return refuse(400, f"the body is not valid JSON ({err})")
        texts = check_texts(payload, config.limits)
        if isinstance(texts, JSONResponse):
            if isinstance(payload, dict) and isinstance(payload.get("texts"), list):
                metrics.texts.labels("rejected").inc(len(payload["texts"]))
            return texts
        min_confidence = request_min_confidence(payload)
        if isinstance(min_confidence, JSONResponse):
            metrics.texts.labels("rejected").inc(len(texts))
            return min_confidence
        scored = await served.batcher.score(texts)
        faults = [(i, r) for i, r in enumerate(scored) if isinstance(r, TextFault)]
        if faults:  # the request's own texts failed: the first is named, nothing is scored
            index, fault = faults[0]
            more = (
                f" ({len(faults) - 1} more text(s) of this request too)" if len(faults) > 1 else ""
            )
            metrics.texts.labels("rejected").inc(len(texts))
            return refuse(
                422,
                f"texts[{index}] cannot be scored: {fault}{more}; "
                f"the text: {texts[index][:MAX_SHOWN_CHARS]!r}",
            )
        for result in scored:
            if isinstance(result, Exception):  # the server's fault: a 500
                metrics.texts.labels("error").inc(len(texts))
                raise result
        predictions = served.classifier.predictions(
            np.stack([s.logits for s in scored]), min_confidence
        )
        metrics.texts.labels("answered").inc(len(texts))
        for p in predictions:
            metrics.predictions.labels(p.top_label).inc()
            if p.abstained:
                metrics.abstentions.inc()
        if served.text_log is not None:
            served.text_log.append(
                log_rows(predictions, scored, texts, served.metadata["model_sha256"])
            )
        return JSONResponse(
            {
                "predictions": [
                    {
                        "index": i,
                        "label": p.label,
                        "top_label": p.top_label,
                        "scores": p.scores,
                        "truncated": s.truncated,
                    }
                    for i, (p, s) in enumerate(zip(predictions, scored, strict=True))
                ]
            }
        )

    routes = [
        Route("/predict", predict, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metadata", metadata, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def serve(config: ServeConfig, host: str, port: int, graceful_s: float) -> int:
    """Run the server until a signal stops it, or the model fails to load (then 1). After a
    graceful shutdown uvicorn re-raises the signal it caught: SIGINT (Ctrl-C) ends here as 0,
    SIGTERM ends the process as the signal's default does."""
    import uvicorn

    failures: list[str] = []
    server: uvicorn.Server | None = None

    def stop_on_failure(message: str) -> None:
        failures.append(message)
        if server is not None:
            server.should_exit = True

    app = create_app(config, on_load_failure=stop_on_failure)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=host, port=port, log_level="info", timeout_graceful_shutdown=graceful_s
        )
    )
    with contextlib.suppress(KeyboardInterrupt):  # as uvicorn.run does
        server.run()
    return 1 if failures else 0
