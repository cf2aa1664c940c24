"""Where `newsclf predict` reads texts from, in chunks: arguments, a text file or stdin (one text per
line), a CSV with a header or a Parquet file (a `text` column, and `id` when there is one).

Nothing reads the whole input first: each source yields chunks of at most `chunk_size` items, and a
line source also yields what it has whenever its input stalls (a pipe fed by a slow producer), so
results appear while input is still coming. Every item keeps its number in the input (line, row or
argument, from 1) so that outputs join back to inputs even when empty ones are skipped.
"""

from __future__ import annotations

import codecs
import csv
import os
import select
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

READ_BYTES = 1 << 20
BOM = codecs.BOM_UTF8
# Python's csv refuses a field over 131,072 characters; a long text is an input like any other
# (truncated to the model's max_length), so the limit is raised to what a C long holds everywhere.
CSV_FIELD_LIMIT = 2**31 - 1


class InputError(Exception):
    """Unreadable or empty input: reported in one line, exit status 1."""


@dataclass(frozen=True)
class Item:
    number: int  # line, row or argument number in the input, from 1
    text: str | None
    id: str | None = None


@dataclass(frozen=True)
class Source:
    name: str  # "arguments", "stdin" or the file's path
    unit: str  # what `number` counts: "argument", "line" or "row"
    chunks: Iterator[list[Item]]
    total: int | None  # items in the input when known without reading it, for the progress bar


def from_arguments(texts: Sequence[str]) -> Source:
    """Texts given as arguments; one that is not UTF-8 (Python keeps its bytes as surrogate
    escapes) is an InputError naming the argument and the byte."""
    for number, text in enumerate(texts, start=1):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            char = text[err.start]
            # Python keeps an undecodable byte B of an argument as the surrogate U+DC00+B.
            is_byte = "\udc80" <= char <= "\udcff"
            what = f"byte 0x{ord(char) - 0xDC00:02x}" if is_byte else f"lone surrogate {char!r}"
            raise InputError(
                f"argument {number}: not UTF-8 text ({what} at character {err.start}); "
                "check the shell's locale or pass the text in a UTF-8 file with --file"
            ) from None
    items = [Item(n, text) for n, text in enumerate(texts, start=1)]
    return Source("arguments", "argument", iter([items]), len(items))


def _readable_now(fd: int) -> bool:
    """True when a read would not wait (always for a regular file; for a pipe, data is there)."""
    return bool(select.select([fd], [], [], 0)[0])


def _decode_line(raw: bytes, source: str, number: int, offset: int) -> str:
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise InputError(
            f"{source}: binary data (NUL byte at offset {offset + nul}, line {number}), not text"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(
            f"{source}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset "
            f"{offset + err.start}, line {number})"
        ) from err


def line_chunks(fd: int, source: str, chunk_size: int) -> Iterator[list[Item]]:
    """Lines of the file descriptor `fd` (split on \\n, a trailing \\r dropped), decoded as UTF-8.

    A chunk is yielded when it holds `chunk_size` lines, or as soon as no more input is ready.
    """
    pending, items = b"", []
    number, offset = 0, 0  # lines done so far; byte offset of `pending` in the input
    first = True
    while True:
        data = os.read(fd, READ_BYTES)
        if first and data:
            first = False
            # A binary file shows itself in its first block; fail before printing anything.
            nul = data.find(b"\x00")
            if nul >= 0:
                raise InputError(f"{source}: binary data (NUL byte at offset {nul}), not text")
            if data.startswith(BOM):
                data, offset = data[len(BOM) :], len(BOM)
        if not data:
            break
        *lines, pending = (pending + data).split(b"\n")
        for raw in lines:
            number += 1
            try:
                text = _decode_line(raw.removesuffix(b"\r"), source, number, offset)
            except InputError:
                if items:  # the lines before it are scored and printed before the error
                    yield items
                raise
            items.append(Item(number, text))
            offset += len(raw) + 1
        while len(items) >= chunk_size:
            yield items[:chunk_size]
            items = items[chunk_size:]
        if items and not _readable_now(fd):
            yield items
            items = []
    if pending:
        number += 1
        try:
            items.append(
                Item(number, _decode_line(pending.removesuffix(b"\r"), source, number, offset))
            )
        except InputError:
            if items:
                yield items
            raise
    if items:
        yield items


def count_lines(path: Path) -> int:
    """Lines in a text file as `line_chunks` numbers them (a last line without \\n counts)."""
    count, last = 0, b"\n"
    with path.open("rb") as f:
        while block := f.read(READ_BYTES):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def from_lines(path: Path | None, chunk_size: int) -> Source:
    """A text file, or stdin when `path` is None."""
    if path is None:
        fd = 0
        return Source("stdin", "line", line_chunks(fd, "stdin", chunk_size), None)

    def chunks() -> Iterator[list[Item]]:
        with path.open("rb") as f:
            yield from line_chunks(f.fileno(), str(path), chunk_size)

    return Source(str(path), "line", chunks(), count_lines(path))


def csv_chunks(path: Path, chunk_size: int) -> Iterator[list[Item]]:
    with path.open("rb") as f:
        start = f.read(READ_BYTES)
    nul = start.find(b"\x00")
    if nul >= 0:
        raise InputError(f"{path}: binary data (NUL byte at offset {nul}), not text")
    csv.field_size_limit(CSV_FIELD_LIMIT)
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        try:
            fields = reader.fieldnames
        except UnicodeDecodeError as err:
            raise InputError(f"{path}: not UTF-8 text in its header ({err.reason})") from err
        if fields is None:
            raise InputError(f"{path}: empty CSV; it needs a header with a `text` column")
        if "text" not in fields:
            raise InputError(
                f"{path}: CSV needs a header with a `text` column; its columns are {fields}"
            )
        has_id = "id" in fields
        items: list[Item] = []
        number = 0
        try:
            for row in reader:
                number += 1
                items.append(Item(number, row["text"], row["id"] if has_id else None))
                if len(items) == chunk_size:
                    yield items
                    items = []
        except (UnicodeDecodeError, csv.Error) as err:
            raise InputError(
                f"{path}: row {number + 1} (file line {reader.line_num}): cannot read it ({err})"
            ) from err
        if items:
            yield items


def parquet_source(path: Path, chunk_size: int) -> Source:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"{path}: not a readable Parquet file ({err})") from err
    schema = parquet.schema_arrow
    if "text" not in schema.names:
        raise InputError(f"{path}: no `text` column (has: {', '.join(schema.names)})")
    text_type = schema.field("text").type
    if not pa.types.is_string(text_type) and not pa.types.is_large_string(text_type):
        raise InputError(f"{path}: column `text` is {text_type}, not strings")
    columns = ["text", "id"] if "id" in schema.names else ["text"]

    def chunks() -> Iterator[list[Item]]:
        number = 0
        # Row groups are read one batch at a time: memory stays that of one chunk.
        for batch in parquet.iter_batches(batch_size=chunk_size, columns=columns):
            texts = batch.column("text").to_pylist()
            ids = batch.column("id").to_pylist() if "id" in columns else [None] * len(texts)
            yield [
                Item(number + i, text, None if row_id is None else str(row_id))
                for i, (text, row_id) in enumerate(zip(texts, ids, strict=True), start=1)
            ]
            number += len(texts)

    return Source(str(path), "row", chunks(), parquet.metadata.num_rows)


def open_source(
    texts: Sequence[str], file: str | None, chunk_size: int, stdin_is_tty: bool
) -> Source:
    """The input `newsclf predict` was given: arguments, `--file`, or stdin."""
    if texts and file:
        raise InputError("give texts as arguments or --file, not both")
    if texts:
        return from_arguments(texts)
    if file:
        path = Path(file)
        if path.is_dir():
            raise InputError(f"{path}: a folder, not a file; give one file with --file")
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            return parquet_source(path, chunk_size)
        if suffix == ".csv":
            return Source(str(path), "row", csv_chunks(path, chunk_size), None)
        return from_lines(path, chunk_size)
    if stdin_is_tty:
        raise InputError("no texts: give them as arguments, with --file, or on stdin")
    return from_lines(None, chunk_size)
