"""`newsclf serve --log DIR`: every scored text, appended to rotating Parquet files for
`newsclf monitor`.

A file holds `rows_per_file` texts (fewer when `flush_s` seconds pass first, at close, or when
the buffered texts pass `MAX_BUFFER_BYTES`), written whole under a temporary name and renamed (a
reader never sees half a file); once the folder's log files pass `max_bytes`, the oldest are
deleted, so disk use stays bounded. Rows are buffered in memory and written by a background
thread, so the scoring path only appends to a list. A write that fails (a full disk, a folder
gone) is logged and its rows kept for the next try, every RETRY_S; past `MAX_BUFFER_ROWS`
buffered rows the oldest are dropped, counted (`rows_dropped`, in serve's /metrics) and logged:
the service keeps answering. What is buffered when the process is killed (up to `flush_s` of
texts) is lost.

Schema (one row per scored text; `LOG_SCHEMA`):
- `time`: when it was scored, UTC, microseconds
- `text`: the text as received
- `label`: the answer (null when the text was abstained on: below the request's min_confidence)
- `top_label`: the model's top label (always set)
- `confidence`: the top label's (calibrated) score
- `scores`: every label's score, in the order of the file's `labels` metadata
- `model_sha256`: the served model file's SHA-256
- `truncated`: whether the text was cut to the model's max length
The file's key-value metadata holds `labels` (a JSON list).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

LOG_GLOB = "scored-*.parquet"
LABELS_KEY = b"labels"
# A file is written early once the buffered texts reach this size, whatever `rows_per_file` says.
MAX_BUFFER_BYTES = 64 << 20
# Rows kept while writes fail; beyond, the oldest are dropped (and counted): memory stays bounded.
MAX_BUFFER_ROWS = 500_000
RETRY_S = 5.0  # between tries after a failed write

log = logging.getLogger("newsclf.textlog")


def log_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("time", pa.timestamp("us", tz="UTC")),
            ("text", pa.string()),
            ("label", pa.string()),
            ("top_label", pa.string()),
            ("confidence", pa.float64()),
            ("scores", pa.list_(pa.float32())),
            ("model_sha256", pa.string()),
            ("truncated", pa.bool_()),
        ]
    )


@dataclass(frozen=True)
class LogRow:
    time: datetime
    text: str
    label: str | None
    top_label: str
    confidence: float
    scores: Sequence[float]
    model_sha256: str
    truncated: bool


def log_files(folder: Path) -> list[Path]:
    """The folder's log files, oldest first (names sort by time, then sequence)."""
    return sorted(folder.glob(LOG_GLOB))


class TextLog:
    """Appends scored texts to rotating Parquet files in `folder` (created if missing)."""

    def __init__(
        self,
        folder: Path,
        labels: Sequence[str],
        rows_per_file: int = 50_000,
        flush_s: float = 60.0,
        max_bytes: int = 1 << 30,
    ) -> None:
        if rows_per_file < 1 or flush_s <= 0 or max_bytes < 1:
            raise ValueError("rows_per_file, flush_s and max_bytes must be positive")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        # Fail now, naming the folder, rather than at the first write with the service running.
        probe = self.folder / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        self.labels = list(labels)
        self.rows_per_file, self.flush_s, self.max_bytes = rows_per_file, flush_s, max_bytes
        self._rows: list[LogRow] = []
        self._buffered_bytes = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._sequence = 0
        self.files_written = 0
        self.files_deleted = 0
        self.write_errors = 0
        self.rows_dropped = 0
        self._thread = threading.Thread(target=self._run, name="newsclf-textlog", daemon=True)
        self._thread.start()

    def _file_due(self) -> bool:
        """A full file is buffered (by rows, or by bytes of text). Call with the lock held."""
        return len(self._rows) >= self.rows_per_file or self._buffered_bytes >= MAX_BUFFER_BYTES

    def append(self, rows: Sequence[LogRow]) -> None:
        """Queue rows for the next file (cheap: the write happens on the log's thread)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the text log is closed")
            self._rows.extend(rows)
            self._buffered_bytes += sum(len(r.text) for r in rows)
            over = len(self._rows) - MAX_BUFFER_ROWS
            if over > 0:  # writes have been failing for a while: keep the newest rows
                dropped, self._rows = self._rows[:over], self._rows[over:]
                self._buffered_bytes -= sum(len(r.text) for r in dropped)
                self.rows_dropped += over
                log.error("text log %s: %d row(s) dropped, writes failing", self.folder, over)
            due = self._file_due()
        if due:
            self._wake.set()

    def close(self) -> int:
        """Write what is buffered and stop the thread; returns how many rows could not be
        written (0 when all were), which are also logged as lost."""
        with self._lock:
            self._closed = True
        self._wake.set()
        self._thread.join()
        with self._lock:
            lost = len(self._rows)
        if lost:
            log.error("text log %s: %d row(s) could not be written and are lost", self.folder, lost)
        return lost

    def _run(self) -> None:
        """On the timer, or at close, write everything buffered; woken by a full buffer, only
        full files (the rest waits for more rows or the timer)."""
        wait = self.flush_s
        while True:
            timed_out = not self._wake.wait(wait)
            self._wake.clear()
            with self._lock:
                closed = self._closed
            try:
                self.flush(partial=timed_out or closed)
                wait = self.flush_s
            except Exception as err:  # a full disk, a folder gone: keep the rows, try again
                self.write_errors += 1
                log.error("text log %s: write failed (%s); rows kept for a retry", self.folder, err)
                wait = RETRY_S
            if closed:
                return

    def flush(self, partial: bool = True) -> None:
        """Write the buffered rows, `rows_per_file` a file (the last, smaller one only when
        `partial`), then enforce the size bound. Rows whose write fails go back to the head of
        the buffer and the error is raised."""
        while True:
            with self._lock:
                if not self._rows or not (partial or self._file_due()):
                    break
                rows = self._rows[: self.rows_per_file]
                del self._rows[: self.rows_per_file]
                self._buffered_bytes -= sum(len(r.text) for r in rows)
            try:
                self._write(rows)
            except Exception:
                with self._lock:
                    self._rows[:0] = rows
                    self._buffered_bytes += sum(len(r.text) for r in rows)
                raise
        self._prune()

    def _write(self, rows: list[LogRow]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = log_schema().with_metadata({LABELS_KEY: json.dumps(self.labels).encode()})
        table = pa.Table.from_pydict(
            {
                "time": [r.time for r in rows],
                "text": [r.text for r in rows],
                "label": [r.label for r in rows],
                "top_label": [r.top_label for r in rows],
                "confidence": [float(r.confidence) for r in rows],
                "scores": [list(map(float, r.scores)) for r in rows],
                "model_sha256": [r.model_sha256 for r in rows],
                "truncated": [bool(r.truncated) for r in rows],
            },
            schema=schema,
        )
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        self._sequence += 1
        final = self.folder / f"scored-{stamp}-{os.getpid()}-{self._sequence:06d}.parquet"
        partial = final.with_name(f".{final.name}.partial")
        pq.write_table(table, partial, compression="zstd")
        os.replace(partial, final)
        self.files_written += 1

    def _prune(self) -> None:
        """Delete the oldest files while the folder's log files pass `max_bytes` (the newest is
        always kept)."""
        sizes = {}
        for f in log_files(self.folder):
            try:
                sizes[f] = f.stat().st_size
            except FileNotFoundError:  # pruned meanwhile by another process logging here
                continue
        files = list(sizes)
        total = sum(sizes.values())
        for f in files[:-1]:
            if total <= self.max_bytes:
                break
            f.unlink(missing_ok=True)
            total -= sizes[f]
            self.files_deleted += 1


def now_utc() -> datetime:
    return datetime.fromtimestamp(time.time(), tz=UTC)
