"""`newsclf serve` under load on 127.0.0.1, against the same model's offline batch throughput.

    python -m bench.bench_serve                 # after `dvc repro export`
    python -m bench.bench_serve --requests 2000 --rss-requests 10000

The server is the real command in its own process. A client of `--concurrency` connections (one
asyncio task each, keep-alive, plain HTTP/1.1) sends `--requests` requests of one real test text
each and checks every answer against that text's offline prediction (label; an answer for another
text, a lost or doubled one counts as an error). Offline throughput is `newsclf predict`'s path
(OnnxClassifier: tokenize, batches of 64 by length) on the same texts, measured in this run. The
server's resident memory is read before and after `--rss-requests` more requests. Every loop is
bounded in requests and in time (`--max-seconds` per phase). Writes `reports/bench_serve.json` and
prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import psutil

from bench import cpu_name
from newsclf.predict import OnnxClassifier
from stages import paths
from stages.common import write_json

# One report per --precision: `auto` (what `newsclf serve` picks by default), fp32, int8.
OUT_FILES = {
    "auto": Path("reports/bench_serve.json"),
    "fp32": Path("reports/bench_serve_fp32.json"),
    "int8": Path("reports/bench_serve_int8.json"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline(
    model: Path, texts: list[str], batch: int, precision: str = "auto"
) -> tuple[list[str], float]:
    """Labels and texts/s of `newsclf predict`'s path on `texts` (best of two passes)."""
    classifier = OnnxClassifier(model, precision)
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        logits = classifier.logits(classifier.encode(texts).ids, batch)
        best = max(best, len(texts) / (time.perf_counter() - start))
    return [p.label for p in classifier.predictions(logits)], best


async def post(reader, writer, body: bytes) -> tuple[int, bytes]:
    writer.write(
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return status, await reader.readexactly(length)


async def load(
    port: int, texts: list[str], expected: list[str], n: int, concurrency: int, max_s: float
) -> dict:
    """`n` requests (text i % len(texts) each) over `concurrency` connections."""
    latencies: list[float] = []
    answered = np.zeros(n, dtype=int)
    errors = mismatched = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    deadline = time.monotonic() + max_s

    async def worker() -> None:
        nonlocal errors, mismatched
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while not queue.empty() and time.monotonic() < deadline:
                i = queue.get_nowait()
                k = i % len(texts)
                start = time.perf_counter()
                try:
                    status, body = await post(
                        reader, writer, json.dumps({"texts": [texts[k]]}).encode()
                    )
                except (OSError, asyncio.IncompleteReadError):
                    errors += 1
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                latencies.append(time.perf_counter() - start)
                if status != 200:
                    errors += 1
                    continue
                (prediction,) = json.loads(body)["predictions"]
                answered[i] += 1
                mismatched += prediction["label"] != expected[k]
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    done = int((answered > 0).sum())
    ms = np.array(latencies) * 1000
    return {
        "requests": n,
        "answered": done,
        "answered_twice": int((answered > 1).sum()),
        "errors": errors,
        "label_mismatches": mismatched,
        "texts_per_s": round(done / elapsed, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "seconds": round(elapsed, 2),
    }


def start_server(model: Path, port: int, options: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "newsclf.cli", "serve", "--model", str(model), "--port", str(port)]
    cmd += options
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                if b" 200 " in s.recv(1024):
                    return server
        except OSError:
            pass
        time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not start in 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", type=Path, default=paths.ONNX)
    parser.add_argument("--texts", type=int, default=2000, help="distinct test texts sent")
    parser.add_argument("--requests", type=int, default=2000, help="requests per concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rss-requests", type=int, default=10_000)
    parser.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "int8"),
        help="of the server and the offline reference (int8 scores move a little with batch-mates, "
        "so a few near-tie labels differ; fp32 shows that no answer is mixed up)",
    )
    parser.add_argument(
        "--serve-options", default="", help="extra `newsclf serve` options, e.g. '--batch-size 16'"
    )
    parser.add_argument("--max-seconds", type=float, default=300.0, help="per load phase")
    args = parser.parse_args()

    test = pl.read_parquet(paths.TEST, columns=["text"])["text"]
    texts = test.sample(min(args.texts, test.len()), seed=0).to_list()
    expected, offline_tps = offline(args.model, texts, 64, args.precision)
    result: dict = {
        "cpu": cpu_name(),
        "model": str(args.model),
        "offline_texts_per_s": round(offline_tps, 1),
        "precision": args.precision,
        "serve_options": args.serve_options or "(defaults)",
    }
    port = free_port()
    options = ["--precision", args.precision, *args.serve_options.split()]
    server = start_server(args.model, port, options)
    try:
        proc = psutil.Process(server.pid)
        for c in args.concurrency:
            run = asyncio.run(load(port, texts, expected, args.requests, c, args.max_seconds))
            run["ratio_to_offline"] = round(run["texts_per_s"] / offline_tps, 3)
            result[f"concurrency_{c}"] = run
        before = proc.memory_info().rss
        top = max(args.concurrency)
        soak = asyncio.run(load(port, texts, expected, args.rss_requests, top, args.max_seconds))
        after = proc.memory_info().rss
        result["rss_mb"] = {
            "requests": args.rss_requests,
            "answered": soak["answered"],
            "errors": soak["errors"],
            "before": round(before / 2**20, 1),
            "after": round(after / 2**20, 1),
            "growth": round((after - before) / 2**20, 1),
        }
    finally:
        server.terminate()
        server.wait(timeout=60)
    out_file = OUT_FILES[args.precision]
    write_json(result, out_file)
    print(f"{result['cpu']}; offline {result['offline_texts_per_s']} texts/s")
    print(
        f"{'concurrency':>11} {'texts/s':>8} {'ratio':>6} {'p50 ms':>7} {'p95 ms':>7} "
        f"{'p99 ms':>7} {'errors':>6} {'mismatch':>8}"
    )
    for c in args.concurrency:
        r = result[f"concurrency_{c}"]
        print(
            f"{c:>11} {r['texts_per_s']:>8} {r['ratio_to_offline']:>6} {r['p50_ms']:>7} "
            f"{r['p95_ms']:>7} {r['p99_ms']:>7} {r['errors']:>6} {r['label_mismatches']:>8}"
        )
    rss = result["rss_mb"]
    print(
        f"server RSS {rss['before']} -> {rss['after']} MB over {rss['requests']} requests "
        f"({rss['answered']} answered, {rss['errors']} errors)"
    )
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
