"""`newsclf serve` throughput with `--log DIR` on against off, same model, same run.

    python -m bench.bench_serve_log                 # after `dvc repro export`
    python -m bench.bench_serve_log --rounds 8 --requests 3000

Two servers (one logging to a temporary folder, one not) take turns: each round sends
`--requests` one-text requests over `--concurrency` connections to each (bench_serve's client:
every answer checked against the text's offline label), the order alternating from round to round
so that a drift in the machine's load falls on both alike. The ratio is the median over rounds of
each round's texts/s with the log over without; the target is >= 0.95.
The logging server's files are counted and read back at the end (rows = texts answered).
Bounded: requests per round and `--max-seconds` per phase. Writes `reports/bench_serve_log.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

import polars as pl

from bench import cpu_name
from bench.bench_serve import free_port, load, offline, start_server
from newsclf.textlog import log_files
from stages import paths
from stages.common import write_json

OUT_FILE = Path("reports/bench_serve_log.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", type=Path, default=paths.ONNX)
    parser.add_argument("--texts", type=int, default=2000, help="distinct test texts sent")
    parser.add_argument("--requests", type=int, default=2000, help="requests per round and server")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--max-seconds", type=float, default=300.0, help="per load phase")
    args = parser.parse_args()

    test = pl.read_parquet(paths.TEST, columns=["text"])["text"]
    texts = test.sample(min(args.texts, test.len()), seed=0).to_list()
    expected, offline_tps = offline(args.model, texts, 64)
    rounds: dict[str, list[dict]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(tmp) / "log"
        # Small files, so the bench also pays for rotation and writes during the load.
        servers = {
            "off": start_server(args.model, port_off := free_port(), []),
            "on": start_server(
                args.model,
                port_on := free_port(),
                ["--log", str(log_dir), "--log-rows-per-file", "5000"],
            ),
        }
        ports = {"off": port_off, "on": port_on}
        try:
            for i in range(args.rounds):
                for name in ("off", "on") if i % 2 == 0 else ("on", "off"):
                    rounds[name].append(
                        asyncio.run(
                            load(
                                ports[name],
                                texts,
                                expected,
                                args.requests,
                                args.concurrency,
                                args.max_seconds,
                            )
                        )
                    )
        finally:
            for server in servers.values():
                server.terminate()
                server.wait(timeout=60)
        files = log_files(log_dir)
        logged = pl.scan_parquet(files).select(pl.len()).collect().item() if files else 0
        log_mb = sum(f.stat().st_size for f in files) / 2**20
    answered_on = sum(r["answered"] for r in rounds["on"])
    median = {
        name: statistics.median(r["texts_per_s"] for r in runs) for name, runs in rounds.items()
    }
    ratios = [
        on["texts_per_s"] / off["texts_per_s"]
        for off, on in zip(rounds["off"], rounds["on"], strict=True)
    ]
    result = {
        "cpu": cpu_name(),
        "model": str(args.model),
        "offline_texts_per_s": round(offline_tps, 1),
        "concurrency": args.concurrency,
        "requests_per_round": args.requests,
        "rounds": rounds,
        "median_texts_per_s": median,
        "round_ratios": [round(r, 3) for r in ratios],
        "ratio_on_to_off": round(statistics.median(ratios), 3),
        "logged_rows": logged,
        "answered_with_log": answered_on,
        "log_files": len(files),
        "log_mb": round(log_mb, 2),
        "errors": sum(r["errors"] for runs in rounds.values() for r in runs),
    }
    write_json(result, OUT_FILE)
    print(f"{result['cpu']}; offline {result['offline_texts_per_s']} texts/s")
    print(f"{'round':>5} {'off texts/s':>11} {'on texts/s':>10} {'on/off':>6}")
    for i, (off, on) in enumerate(zip(rounds["off"], rounds["on"], strict=True)):
        print(f"{i + 1:>5} {off['texts_per_s']:>11} {on['texts_per_s']:>10} {ratios[i]:>6.3f}")
    print(
        f"median: off {median['off']}, on {median['on']} texts/s; median round ratio "
        f"{result['ratio_on_to_off']}"
        f" (target >= 0.95); {logged} rows logged for {answered_on} answered, {len(files)} files,"
        f" {result['log_mb']} MB; errors {result['errors']}"
    )
    print(f"wrote {OUT_FILE}")


if __name__ == "__main__":
    main()
