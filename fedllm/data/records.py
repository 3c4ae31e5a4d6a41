"""Reading raw records from files, folders and the Hugging Face hub, with field renaming and sampling.

Every record keeps where it came from (file and 1-based row) so that a bad one can be reported
precisely. Rows are numbered per file: the line number for JSON Lines (what an editor shows),
the 1-based position in the list for JSON, Parquet and CSV (header not counted).
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

T = TypeVar("T")

FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")


class DataFormatError(ValueError):
    """Data that cannot be used, said once and plainly: the file, the 1-based row and the fields found."""

    def __init__(
        self,
        problem: str,
        *,
        source: str | None = None,
        row: int | None = None,
        fields: Iterable[str] | None = None,
        hint: str | None = None,
    ) -> None:
        self.problem, self.source, self.row = problem, source, row
        self.fields = None if fields is None else list(fields)
        where = " ".join(part for part in (source, None if row is None else f"row {row}") if part)
        message = f"{where}: {problem}" if where else problem
        if self.fields is not None:
            message += f"; fields found: {self.fields}"
        if hint:
            message += f"; {hint}"
        super().__init__(message)


class Row(NamedTuple):
    """One record and where it came from."""

    record: dict[str, Any]
    source: str
    row: int

    def error(self, problem: str, hint: str | None = None) -> DataFormatError:
        return DataFormatError(problem, source=self.source, row=self.row, fields=list(self.record), hint=hint)


def _object(value: Any, source: str, row: int) -> Row:
    if not isinstance(value, dict):
        raise DataFormatError(f"expected a JSON object, got {type(value).__name__}", source=source, row=row)
    return Row(value, source, row)


def _read_jsonl(path: Path, text: str) -> list[Row]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"invalid JSON ({e.msg}, column {e.colno})", source=str(path), row=lineno) from None
        rows.append(_object(value, str(path), lineno))
    return rows


def _read_json(path: Path, text: str) -> list[Row]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # a .json file that is really JSON Lines, as the datasets library also accepts
            return _read_jsonl(path, text)
        raise DataFormatError(f"invalid JSON at line {e.lineno} column {e.colno} ({e.msg})", source=str(path)) from None
    if isinstance(value, dict):
        lists = [key for key in ("data", "train") if isinstance(value.get(key), list)]
        if not lists:
            raise DataFormatError(
                "a JSON object must hold the records in a 'data' or 'train' list",
                source=str(path), fields=list(value),
            )
        value = value[lists[0]]
    if not isinstance(value, list):
        raise DataFormatError(f"expected a JSON list of objects, got {type(value).__name__}", source=str(path))
    return [_object(item, str(path), i) for i, item in enumerate(value, start=1)]


def _read_csv(path: Path, text: str) -> list[Row]:
    reader = csv.DictReader(text.splitlines(), restkey="\0extra")
    rows = []
    for i, record in enumerate(reader, start=1):
        if "\0extra" in record:
            raise DataFormatError(
                f"{len(reader.fieldnames or [])} columns in the header but more values in this row",
                source=str(path), row=i,
            )
        rows.append(Row(dict(record), str(path), i))
    return rows


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a corrupt or non-Parquet file
        raise DataFormatError(f"not a readable Parquet file ({e})", source=str(path)) from None
    return [Row(record, str(path), i) for i, record in enumerate(records, start=1)]


def _read_file(path: Path) -> list[Row]:
    if path.suffix == ".parquet":
        return _read_parquet(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a byte-order mark from spreadsheet exports
    except UnicodeDecodeError as e:
        raise DataFormatError(f"not UTF-8 text ({e})", source=str(path)) from None
    readers = {".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv}
    if path.suffix not in readers:
        raise DataFormatError(f"unsupported file type; use one of {', '.join(FILE_SUFFIXES)}", source=str(path))
    return readers[path.suffix](path, text)


def _read_hub(name: str) -> list[Row]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split="train")
    except Exception as e:  # the hub client raises many types; all mean "cannot use this name"
        raise DataFormatError(
            f"not a local file or folder, and loading it as a Hugging Face dataset failed ({type(e).__name__}: {e})",
            source=name,
        ) from None
    return [Row(dict(record), name, i) for i, record in enumerate(dataset, start=1)]


def _looks_like_path(source: str) -> bool:
    return source.endswith(FILE_SUFFIXES) or source.startswith(("/", "./", "../", "~")) or "\\" in source


def read_rows(source: str, field_map: str | None = None) -> list[Row]:
    """All records of ``source`` (file, folder or hub dataset name) with their origins, fields renamed."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in FILE_SUFFIXES)
        if not files:
            raise DataFormatError(f"folder has no {', '.join(FILE_SUFFIXES)} files", source=source)
        rows = [row for file in files for row in _read_file(file)]
    elif path.is_file():
        rows = _read_file(path)
    elif _looks_like_path(source):
        raise DataFormatError("no such file or folder", source=source)
    else:
        rows = _read_hub(source)
    if not rows:
        raise DataFormatError("no records", source=source)
    mapping = parse_field_map(field_map)
    if mapping:
        rows = [row._replace(record=rename_fields(row.record, mapping)) for row in rows]
    return rows


def parse_field_map(field_map: str | None) -> dict[str, str]:
    """``"question=instruction,answer=output"`` -> ``{"question": "instruction", "answer": "output"}``."""
    mapping = {}
    for item in (field_map or "").split(","):
        if not item.strip():
            continue
        old, sep, new = (part.strip() for part in item.partition("="))
        if not sep or not old or not new:
            raise ValueError(f"bad field_map entry {item!r}: expected OLD=NEW, 'question=instruction,answer=output'")
        mapping[old] = new
    return mapping


def rename_fields(record: dict[str, Any], mapping: dict[str, str]) -> dict[str, Any]:
    """Rename fields; a renamed field replaces a field already carrying the new name."""
    renamed = {key: value for key, value in record.items() if key not in mapping}
    renamed.update({new: record[old] for old, new in mapping.items() if old in record})
    return renamed


def sample(items: Sequence[T], dataset_sample: int | None, seed: int) -> list[T]:
    """A seeded random subset of ``dataset_sample`` items in their original order (all when None or larger)."""
    if dataset_sample is None or dataset_sample >= len(items):
        return list(items)
    if dataset_sample < 1:
        raise ValueError(f"dataset_sample must be at least 1, got {dataset_sample}")
    keep = sorted(random.Random(seed).sample(range(len(items)), dataset_sample))
    return [items[i] for i in keep]


def load_records(
    source: str, *, field_map: str | None = None, dataset_sample: int | None = None, seed: int = 0
) -> list[dict]:
    """Records of a local .json/.jsonl/.parquet/.csv file, a folder of them (sorted), or a hub dataset name.

    ``field_map`` renames fields (``"question=instruction,answer=output"``); ``dataset_sample`` keeps a
    seeded random subset. Unreadable data raises :class:`DataFormatError` naming the file and row.
    """
    return [row.record for row in sample(read_rows(source, field_map), dataset_sample, seed)]
