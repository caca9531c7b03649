"""Prompt files: `.txt`, `.jsonl`, `.csv`, or `-` for stdin, parsed into validated `JobSpec`s.

A file is accepted whole or refused whole: every line is validated before anything is queued, and
all the errors found (up to `MAX_ERRORS`) are reported together, each naming file, line and field,
so a user fixes a file in one pass instead of one error per submit.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator

from shared.errors import PromptFileError
from shared.schema import SPEC_FIELDS, JobError, JobSpec

MAX_ERRORS = 20
SUFFIXES = {".txt": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
STDIN_NAME = "<stdin>"


@dataclass(frozen=True)
class FileError:
    file: str
    line: int          # 1-based; 0 when the error is about the file as a whole
    field: str         # the job field at fault, or "json", "csv", "encoding", "file"
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.message}"




@dataclass(frozen=True)
class PromptEntry:
    """A validated job and where it came from, so later refusals can name the line."""

    line: int
    spec: JobSpec


class _Errors:
    def __init__(self, file: str):
        self.file = file
        self.kept: list[FileError] = []
        self.more = 0

    def add(self, line: int, field: str, message: str) -> None:
        if len(self.kept) < MAX_ERRORS:
            self.kept.append(FileError(self.file, line, field, message))
        else:
            self.more += 1

    def raise_if_any(self) -> None:
        if self.kept:
            raise PromptFileError(self.kept, self.more)


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig")  # tolerate the BOM spreadsheet tools write
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        message = f"not UTF-8 ({exc.reason} at byte {exc.start})"
        raise PromptFileError([FileError(name, line, "encoding", message)]) from None


def _text_records(text: str) -> Iterator[tuple[int, object]]:
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            yield number, {"prompt": line}


class _NotJson:
    def __init__(self, message: str):
        self.message = message


def _jsonl_records(text: str) -> Iterator[tuple[int, object]]:
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            # NaN and Infinity parse here and are refused by the schema, which names the field.
            yield number, json.loads(raw)
        except json.JSONDecodeError as exc:
            yield number, _NotJson(f"not valid JSON: {exc.msg} at column {exc.colno}")
        except RecursionError:
            yield number, _NotJson("not valid JSON: nested too deeply")


def _csv_records(text: str, errors: _Errors) -> Iterator[tuple[int, object]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames
    except csv.Error as exc:
        errors.add(1, "csv", str(exc))
        return
    if not header:
        return
    header = [h.strip() for h in header]
    reader.fieldnames = header
    if "prompt" not in header:
        errors.add(1, "prompt", f"the header row has no 'prompt' column (columns: {', '.join(header)})")
        return
    unknown = [h for h in header if h not in SPEC_FIELDS]
    for column in unknown:
        errors.add(1, column or "(empty)", f"unknown column (known: {', '.join(SPEC_FIELDS)})")
    if unknown:
        return
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            errors.add(reader.line_num, "csv", str(exc))
            return
        # The line the row ends on: the row's own line unless a quoted cell spans lines.
        number = reader.line_num
        if None in row:  # DictReader files surplus cells under the key None
            errors.add(number, "csv", f"{len(header) + len(row[None])} cells; the header has {len(header)}")
            continue
        if not any((v or "").strip() for v in row.values()):
            continue  # a blank row, as spreadsheets leave at the end
        yield number, {k: v for k, v in row.items() if v is not None}


def validate_records(records: Iterable[tuple[int, object]], name: str, defaults: dict | None = None,
                     errors: _Errors | None = None, on_progress=None) -> list[PromptEntry]:
    """Validate (line, raw dict) pairs into entries, or raise PromptFileError listing every bad one.

    `on_progress(done, total)` is told how far validation got, when the records are a list."""
    errors = errors or _Errors(name)
    entries = []
    total = len(records) if isinstance(records, list) else 0
    for done, (number, raw) in enumerate(records, 1):
        if on_progress is not None and total:
            on_progress(done, total)
        if isinstance(raw, _NotJson):
            errors.add(number, "json", raw.message)
            continue
        try:
            entries.append(PromptEntry(number, JobSpec.from_dict(raw, defaults)))
        except JobError as exc:
            errors.add(number, exc.field, exc.message)
    errors.raise_if_any()
    if not entries:
        raise PromptFileError([FileError(name, 0, "file", "holds no prompts")])
    return entries


def format_of(path: str, text: str | None = None) -> str:
    """"text", "jsonl" or "csv": from the suffix, or for stdin from the first non-blank line."""
    if path == "-":
        first = next((line.strip() for line in (text or "").splitlines() if line.strip()), "")
        return "jsonl" if first.startswith("{") else "text"
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUFFIXES:
        message = f"unknown suffix {suffix!r}; expected .txt, .jsonl or .csv, or - for stdin"
        raise PromptFileError([FileError(path, 0, "file", message)])
    return SUFFIXES[suffix]


def parse_text(text: str, kind: str, name: str, defaults: dict | None = None,
               on_progress=None) -> list[PromptEntry]:
    errors = _Errors(name)
    if kind == "text":
        records = _text_records(text)
    elif kind == "jsonl":
        records = _jsonl_records(text)
    elif kind == "csv":
        records = _csv_records(text, errors)
    else:
        raise ValueError(f"unknown prompt file kind {kind!r}")
    return validate_records(list(records), name, defaults, errors, on_progress)


def parse_prompt_file(path: str, defaults: dict | None = None, stdin=None, on_progress=None) -> list[PromptEntry]:
    """Read and validate a prompt file (`-` reads `stdin`, default sys.stdin)."""
    if path == "-":
        stream = stdin if stdin is not None else sys.stdin
        data = stream.buffer.read() if hasattr(stream, "buffer") else stream.read()
        text = _decode(data, STDIN_NAME) if isinstance(data, bytes) else data
        return parse_text(text, format_of("-", text), STDIN_NAME, defaults, on_progress)
    kind = format_of(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise PromptFileError([FileError(path, 0, "file", exc.strerror or str(exc))]) from None
    return parse_text(_decode(data, path), kind, path, defaults, on_progress)


def source_name(path: str) -> str:
    """What batch metadata records of the file: its base name only, never a path."""
    return STDIN_NAME if path == "-" else os.path.basename(path)
