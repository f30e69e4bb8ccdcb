"""What the dataset commands, ``python -m verl_npd.eval`` and ``python -m verl_npd.score``, share: a
verl dataset file in and out (``.jsonl`` or ``.parquet``, every input column written back), the checks
of their arguments, and bad input as one line on stderr with exit code 2."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from verl_npd.tokenizers import TokenizerError

EXTENSIONS = (".jsonl", ".parquet")
EXIT_BAD_INPUT = 2


class InputError(Exception):
    """A problem with the user's input; reported as one line, exit code 2."""


@dataclass
class Table:
    """The input rows: a pyarrow table (parquet) or a list of dicts (jsonl), kept as read so that
    every input column is written back unchanged."""

    path: Path
    arrow: object | None = None
    records: list[dict] | None = None

    @property
    def columns(self) -> list[str]:
        if self.arrow is not None:
            return list(self.arrow.column_names)
        return list(dict.fromkeys(key for record in self.records for key in record))

    @property
    def num_rows(self) -> int:
        return self.arrow.num_rows if self.arrow is not None else len(self.records)

    def column(self, name: str) -> list:
        if self.arrow is not None:
            return self.arrow.column(name).to_pylist()
        return [record.get(name) for record in self.records]

    def to_records(self) -> list[dict]:
        return self.arrow.to_pylist() if self.arrow is not None else [dict(r) for r in self.records]


def check_extension(path: Path, flag: str) -> None:
    if path.suffix not in EXTENSIONS:
        raise InputError(f"{flag} {path}: unknown extension {path.suffix!r}; expected one of {EXTENSIONS}")


def read_table(path: Path) -> Table:
    check_extension(path, "--data")
    if not path.is_file():
        raise InputError(f"--data {path}: file not found")
    if path.suffix == ".parquet":
        table = Table(path, arrow=_read_parquet(path))
    else:
        table = Table(path, records=_read_jsonl(path))
    if table.num_rows == 0:
        raise InputError(f"--data {path}: the dataset is empty")
    return table


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except Exception as e:  # pyarrow has its own error types (ArrowInvalid, ...) besides OSError
        raise InputError(f"--data {path}: not a readable .parquet file: {one_line(e)}") from None


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    try:
        with path.open(encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if line.strip():
                    records.append(_json_object(line, path, line_number))
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--data {path}: cannot read: {one_line(e)}") from None
    return records


def _json_object(line: str, path: Path, line_number: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"--data {path}: line {line_number} is not valid JSON: {e.msg}") from None
    if not isinstance(record, dict):
        raise InputError(f"--data {path}: line {line_number} is not a JSON object")
    return record


def write_table(table: Table, path: Path, new_columns: dict[str, list]) -> None:
    """Input rows plus ``new_columns`` (replacing same-named input columns) in ``path``'s format."""
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrow = table.arrow if table.arrow is not None else pa.Table.from_pylist(table.records)
        for name, values in new_columns.items():
            if name in arrow.column_names:
                arrow = arrow.drop_columns([name])
            arrow = arrow.append_column(name, pa.array(values))
        pq.write_table(arrow, path)
    else:
        with path.open("w", encoding="utf-8") as f:
            for i, record in enumerate(table.to_records()):
                record.update({name: values[i] for name, values in new_columns.items()})
                # default=str: parquet input may hold dates/bytes, which JSON cannot represent.
                f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")


def check_columns(table: Table, *names: str) -> None:
    available = table.columns
    for name in names:
        if name not in available:
            raise InputError(f"--data {table.path}: no column {name!r}; available columns: {available}")


def to_messages(value, row: int, column: str) -> list[dict]:
    """A prompt cell as chat messages: a list of {role, content} dicts, or text as one user turn."""
    where = f"row {row} (0-based), column {column!r}"
    if value is None:
        raise InputError(f"{where}: missing prompt")
    if isinstance(value, str):
        if not value.strip():
            raise InputError(f"{where}: empty prompt")
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        if not value:
            raise InputError(f"{where}: empty message list")
        for message in value:
            if not (isinstance(message, dict) and isinstance(message.get("role"), str) and "content" in message):
                raise InputError(f"{where}: expected a list of {{'role', 'content'}} messages, got {message!r:.80}")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise InputError(f"{where}: expected text or a list of chat messages, got {type(value).__name__}")


def check_model_dir(path: str, flag: str) -> None:
    if not Path(path).is_dir():
        raise InputError(f"{flag} {path}: model directory not found")


@contextlib.contextmanager
def naming(flag: str) -> Iterator[None]:
    """A tokenizer that cannot be loaded or shared (:mod:`verl_npd.tokenizers`) is bad input to ``flag``."""
    try:
        yield
    except TokenizerError as e:
        raise InputError(f"{flag}: {e}") from None


def check_out(out: Path) -> None:
    """``--out``: a known extension, in a directory that exists."""
    check_extension(out, "--out")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: directory {out.parent} does not exist")


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def run_command(parse, run_parsed, argv: list[str] | None) -> int:
    """A command's main: parse ``argv``, run, print the summary as JSON; bad input ends with one
    line on stderr and exit code 2."""
    args = parse(argv)
    try:
        summary = run_parsed(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(summary, indent=2))
    return 0
