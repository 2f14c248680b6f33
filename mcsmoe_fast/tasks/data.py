"""Loading a task's raw examples: from the hub through `datasets`, or from a local file with the same columns.

A local file holds the raw fields of the task, named and typed as the hub dataset's columns (docs/tasks.md
lists them per task; `task.columns` has them in code). Every required column must be there; other
columns are kept and ignored:

- .jsonl: one JSON object per line (blank lines skipped);
- .json: a JSON list of objects, or an object whose "data" key holds that list;
- .csv: a header row naming the columns, one example per row; "int" columns hold digits, "dict" columns
  (SQuAD's answers, HotpotQA's context and supporting_facts, MultiRC's idx) hold JSON text.

Files are read as UTF-8; a leading byte-order mark (Excel's "CSV UTF-8") is skipped. The values are checked
against the columns' kinds, inside object columns too (SQuAD's answers.text must be a list of strings).
Examples come back as plain dicts, in file order.
"""
from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from .base import Column, Task
from .registry import get_task

FILE_SUFFIXES = (".jsonl", ".json", ".csv")


def load_task_data(task: Task | str, split: str = "validation", path: str | Path | None = None,
                   limit: int | None = None) -> list[dict]:
    """The raw examples of `task`: the first `limit` (all when None) of `split` from the hub dataset
    (`datasets.load_dataset(task.hub_id, task.hub_config, split=split)`), or of the local .jsonl / .json /
    .csv file `path` (the file is the split: `split` is then unused). Raises ValueError naming the missing
    columns, or the file, line and column of a malformed value."""
    task = get_task(task)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    if path is not None:
        return read_task_file(task, path, limit)
    return _load_hub(task, split, limit)


def check_labelled(task: Task | str, examples: Sequence[Mapping], where: str = "", role: str = "example") -> None:
    """Every example labelled, its label in range and its prompt renderable (COPA: a question "cause" or
    "effect"), as training and scoring need them: a ValueError naming `where` (the file or split), the
    example's index and the problem, before a run that would only reach the example after hours."""
    task = get_task(task)
    for i, example in enumerate(examples):
        try:
            task.to_text(example)
        except ValueError as exc:
            raise ValueError(f"{where}: {role} {i}: {exc}" if where else f"{role} {i}: {exc}") from None


def _load_hub(task: Task, split: str, limit: int | None) -> list[dict]:
    where = f"{task.hub_id!r}" + (f" (config {task.hub_config!r})" if task.hub_config else "")
    try:
        import datasets
    except ImportError as exc:
        raise ValueError(f"loading {task.name} from the hub needs the `datasets` package (pip install datasets); "
                         "or pass path= a local .jsonl/.json/.csv file") from exc
    try:
        data = datasets.load_dataset(task.hub_id, task.hub_config, split=split)
    except Exception as exc:  # offline, unknown split, script-only repository: one clear error
        raise ValueError(f"could not load {task.name} from the hub dataset {where}, split {split!r}: {exc}; "
                         f"or pass path= a local .jsonl/.json/.csv file with the columns "
                         f"{', '.join(task.column_names)}") from exc
    missing = [name for name in task.column_names if name not in data.column_names]
    if missing:
        raise ValueError(f"{task.name}: hub dataset {where} split {split!r} has no column(s) {', '.join(missing)}; "
                         f"its columns: {', '.join(data.column_names)}")
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    return data.to_list()


def read_task_file(task: Task | str, path: str | Path, limit: int | None = None) -> list[dict]:
    """The examples of a local .jsonl / .json / .csv file (see the module docstring), checked against the
    task's columns."""
    task = get_task(task)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{task.name} data file {path} not found")
    if path.suffix not in FILE_SUFFIXES:
        raise ValueError(f"{task.name} data file {path}: expected a .jsonl, .json or .csv file")
    reader = {".jsonl": _jsonl_records, ".json": _json_records, ".csv": _csv_records}[path.suffix]
    examples = []
    for where, record in reader(path, task):
        if limit is not None and len(examples) >= limit:
            break
        examples.append(_check_record(task, record, where))
    return examples


def _jsonl_records(path: Path, task: Task) -> Iterator[tuple[str, dict]]:
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            yield f"{path}:{lineno}", record


def _json_records(path: Path, task: Task) -> Iterator[tuple[str, dict]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of examples (or an object with a \"data\" list)")
    for i, record in enumerate(data):
        yield f"{path}: example {i}", record


def _csv_records(path: Path, task: Task) -> Iterator[tuple[str, dict]]:
    columns = {c.name: c for c in (*task.columns, *task.optional_columns)}
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [name for name in task.column_names if name not in header]
        if missing:
            raise ValueError(f"{path}: {task.name} needs the column(s) {', '.join(missing)} in the CSV header; "
                             f"found {', '.join(header) or 'no header'}")
        for record in reader:
            where = f"{path}:{reader.line_num}"
            if None in record:  # more cells than header names
                raise ValueError(f"{where}: more cells than the {len(header)} header columns")
            for name, column in columns.items():
                if name in record and record[name] is not None:
                    record[name] = _from_csv_cell(record[name], column, where)
            yield where, record


def _from_csv_cell(cell: str, column: Column, where: str):
    if column.kind == "int":  # ASCII digits only: int() would also read "1_0" as 10 and other scripts' digits
        if not re.fullmatch(r"\s*[-+]?[0-9]+\s*", cell):
            raise ValueError(f"{where}: column {column.name!r} must be an integer, got {cell!r}")
        return int(cell)
    if column.kind == "dict":
        try:
            return json.loads(cell)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: column {column.name!r} must hold a JSON object ({exc.msg})") from None
    return cell


def _check_record(task: Task, record, where: str) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with the {task.name} columns, got {type(record).__name__}")
    missing = [name for name in task.column_names if name not in record]
    if missing:
        raise ValueError(f"{where}: {task.name} example has no column(s) {', '.join(missing)} "
                         f"(needs {', '.join(task.column_names)})")
    for column in (*task.columns, *task.optional_columns):
        if column.name in record:
            _check_value(record[column.name], column, where)
    return record


def _check_value(value, column: Column, where: str, name: str | None = None) -> None:
    """`value` has the column's kind; a "dict" column's keys are there and have theirs (named "column.key")."""
    name = name or column.name
    if not column.accepts(value):
        raise ValueError(f"{where}: column {name!r} must be {column.expected}, got {value!r}")
    if column.kind != "dict":
        return
    absent = [key.name for key in column.keys if key.name not in value]
    if absent:
        raise ValueError(f"{where}: column {name!r} has no key(s) {', '.join(absent)}")
    for key in column.keys:
        _check_value(value[key.name], key, where, f"{name}.{key.name}")
    lengths = [len(value[key.name]) for key in column.keys] if column.aligned else []
    if len(set(lengths)) > 1:
        raise ValueError(f"{where}: column {name!r}: {' and '.join(key.name for key in column.keys)} must have one "
                         f"entry each, got {' and '.join(map(str, lengths))}")
