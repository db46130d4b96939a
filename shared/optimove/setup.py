"""Optimove setup data: load, validate, batch and send channel templates (and promotions).

A setup file lists records of one kind, each an id and a name: templates (`TemplateID`,
`TemplateName`) or promotions (`PromoCode`, `PromotionName`); `RecordKind` describes a kind.
`load_records` reads a CSV or JSON file and validates every record before anything is sent;
each `Problem` names the file line it is on (and, for JSON, the item's index in the array).
`sync_records` then sends the records in batches of at most 100 through an `OptimoveClient`,
waiting for the rate limit and retrying temporary failures; if a call still fails it raises
`SyncFailed`, which says how many records went out before it.
"""
from __future__ import annotations

import bisect
import csv
import io
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence
from urllib.parse import urlencode

from shared.optimove.client import OptimoveError, PermanentError, RateLimited, TemporaryError, backoff

MAX_BATCH = 100
MAX_INT_ID = 2**31 - 1
FORMATS = ("csv", "json")


def normalise(name: str) -> str:
    """A column or key name compared loosely: lower case, without spaces, `_` and `-`."""
    return re.sub(r"[\s_\-]", "", str(name)).lower()


@dataclass(frozen=True)
class RecordKind:
    """One kind of setup record: API field names, accepted aliases, id type, and its functions."""

    noun: str                    # "template", used in messages ("250 templates")
    id_field: str                # API field of the id, e.g. "TemplateID"
    name_field: str              # API field of the name, e.g. "TemplateName"
    id_aliases: tuple[str, ...]  # other accepted column/key names for the id (compared normalised)
    name_aliases: tuple[str, ...]
    int_ids: bool                # True: ids are positive integers; False: non-empty strings
    add_function: str            # POST function taking a JSON array of records, e.g. "AddChannelTemplates"
    list_function: str           # GET function returning the stored records, e.g. "GetChannelTemplates"
    category: str = "integrations"
    batch_size: int = MAX_BATCH

    @property
    def plural(self) -> str:
        """The noun in the plural ("templates"); also the accepted JSON wrapper key."""
        return self.noun + "s"

    def count(self, n: int) -> str:
        """`n` with the noun: "1 template", "250 templates"."""
        return f"{n} {self.noun if n == 1 else self.plural}"

    def id_keys(self) -> frozenset[str]:
        """Normalised names accepted for the id column/key."""
        return frozenset(normalise(n) for n in (self.id_field, *self.id_aliases))

    def name_keys(self) -> frozenset[str]:
        """Normalised names accepted for the name column/key."""
        return frozenset(normalise(n) for n in (self.name_field, *self.name_aliases))

    def describe_ids(self) -> str:
        """The accepted id names for messages: "TemplateID, template_id or id"."""
        return _or(self.id_field, *self.id_aliases)

    def describe_names(self) -> str:
        """The accepted name names for messages."""
        return _or(self.name_field, *self.name_aliases)

    def to_api(self, record: "Record") -> dict[str, Any]:
        """The record as Optimove expects it: `{"TemplateID": 1, "TemplateName": "..."}`."""
        return {self.id_field: record.id, self.name_field: record.name}

    def fields_of(self, row: Mapping[str, Any]) -> tuple[Any, Any]:
        """(id, name) of a row Optimove returned, matching key names loosely; None when absent."""
        found = {normalise(k): v for k, v in row.items()} if isinstance(row, Mapping) else {}

        def pick(*names: str) -> Any:
            return next((found[normalise(n)] for n in names if normalise(n) in found), None)

        return pick(self.id_field, *self.id_aliases), pick(self.name_field, *self.name_aliases)


def _or(*names: str) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


TEMPLATES = RecordKind(noun="template", id_field="TemplateID", name_field="TemplateName",
                       id_aliases=("template_id", "id"), name_aliases=("template_name", "name"),
                       int_ids=True, add_function="AddChannelTemplates", list_function="GetChannelTemplates")

PROMOTIONS = RecordKind(noun="promotion", id_field="PromoCode", name_field="PromotionName",
                        id_aliases=("promo_code", "code", "id"), name_aliases=("promotion_name", "name"),
                        int_ids=False, add_function="AddPromotions", list_function="GetPromotions")


@dataclass(frozen=True)
class Record:
    """One validated record and where it came from."""

    id: int | str
    name: str
    line: int               # file line where the record starts
    item: int | None = None  # index in the JSON array (0-based); None for CSV


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a setup file; `str()` is the line printed for the operator."""

    source: str
    message: str
    line: int | None = None
    item: int | None = None

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source} line {self.line}"
        if self.item is not None:
            where += f", item [{self.item}]"
        return f"{where}: {self.message}"


class RecordFileError(Exception):
    """A setup file has problems; nothing from it may be sent."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


MISSING = object()  # a field whose absence was already reported


def _show(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + "…"


class _Collector:
    """Validates raw (id, name) pairs into records, collecting every problem including duplicates."""

    def __init__(self, kind: RecordKind, source: str):
        self.kind = kind
        self.source = source
        self.records: list[Record] = []
        self.problems: list[Problem] = []
        self._first: dict[int | str, tuple[int, int | None]] = {}

    def problem(self, message: str, line: int | None = None, item: int | None = None) -> None:
        self.problems.append(Problem(self.source, message, line, item))

    def add(self, raw_id: Any, raw_name: Any, line: int, item: int | None = None) -> None:
        """Check one record; keep it if valid, else record each of its problems.

        A `MISSING` value is not checked (its absence was reported) and the record is not kept.
        """
        # "" marks a field already reported missing: not printed again, and the record is not kept.
        record_id, id_error = (None, "") if raw_id is MISSING else self._parse_id(raw_id)
        name, name_error = (None, "") if raw_name is MISSING else self._parse_name(raw_name)
        for error in (id_error, name_error):
            if error:
                self.problem(error, line, item)
        if id_error is None:
            first = self._first.setdefault(record_id, (line, item))
            if first != (line, item):
                where = f"line {first[0]}" + (f", item [{first[1]}]" if first[1] is not None else "")
                self.problem(f"duplicate {self.kind.id_field} {_show(record_id)} (first on {where})", line, item)
                return
        if id_error is None and name_error is None:
            self.records.append(Record(record_id, name, line, item))

    def _parse_id(self, raw: Any) -> tuple[Any, str | None]:
        field = self.kind.id_field
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return None, f"{field} is empty"
        if not self.kind.int_ids:
            if isinstance(raw, int) and not isinstance(raw, bool):
                return str(raw), None
            if not isinstance(raw, str):
                return None, f"{field} {_show(raw)} is not a string"
            return raw.strip(), None
        if isinstance(raw, int) and not isinstance(raw, bool):
            value = raw
        elif isinstance(raw, str) and re.fullmatch(r"\s*[+-]?\d+\s*", raw):
            value = int(raw)
        else:
            return None, f"{field} {_show(raw)} is not an integer"
        if value < 1:
            return None, f"{field} {_show(raw)} is not a positive integer"
        if value > MAX_INT_ID:
            return None, f"{field} {_show(raw)} is too large (at most {MAX_INT_ID})"
        return value, None

    def _parse_name(self, raw: Any) -> tuple[str | None, str | None]:
        field = self.kind.name_field
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return None, f"{field} is empty"
        if not isinstance(raw, str):
            return None, f"{field} {_show(raw)} is not a string"
        return raw.strip(), None


def detect_format(path: Path | str, text: str) -> str:
    """`csv` or `json`: from the file extension, else from the first character."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix in FORMATS:
        return suffix
    return "json" if text.lstrip()[:1] in ("[", "{") else "csv"


def load_records(path: Path | str, kind: RecordKind, fmt: str | None = None) -> list[Record]:
    """Read and validate a CSV or JSON setup file; raise `RecordFileError` listing every problem."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise RecordFileError([Problem(source, "no such file")]) from None
    except UnicodeDecodeError as exc:
        raise RecordFileError([Problem(source, f"not UTF-8 text ({exc.reason} at byte {exc.start})")]) from None
    except OSError as exc:
        raise RecordFileError([Problem(source, f"cannot read: {exc.strerror or exc}")]) from None
    records, problems = parse_records(text, kind, fmt or detect_format(path, text), source)
    if problems:
        raise RecordFileError(problems)
    return records


def parse_records(text: str, kind: RecordKind, fmt: str, source: str = "<input>") -> tuple[list[Record], list[Problem]]:
    """Validate `text` (`csv` or `json`): the valid records and every problem found."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    out = _Collector(kind, source)
    (_parse_csv if fmt == "csv" else _parse_json)(text.lstrip("\ufeff"), out)
    if not out.records and not out.problems:
        out.problem(f"no {kind.plural} in the file")
    return out.records, out.problems


# --- CSV -------------------------------------------------------------------------------------

def _csv_columns(header: list[str], line: int, out: _Collector) -> tuple[int, int] | None:
    """Positions of the id and name columns in the header row, or None (problems recorded)."""
    kind = out.kind
    keys = [normalise(h) for h in header]
    columns = []
    for field, accepted, described in ((kind.id_field, kind.id_keys(), kind.describe_ids()),
                                       (kind.name_field, kind.name_keys(), kind.describe_names())):
        found = [i for i, key in enumerate(keys) if key in accepted]
        if not found:
            out.problem(f"the header has no {field} column (accepted: {described}); the first line must be "
                        f"a header such as {kind.id_field},{kind.name_field}", line)
        elif len(found) > 1:
            out.problem(f"the header has {len(found)} {field} columns: "
                        + ", ".join(header[i].strip() for i in found), line)
        columns.append(found[0] if len(found) == 1 else None)
    return None if None in columns else (columns[0], columns[1])


def _csv_row(row: list[str], columns: tuple[int, int], width: int, line: int, out: _Collector) -> None:
    extra = [cell for cell in row[width:] if cell.strip()]
    if extra:
        out.problem(f"{len(row)} values but the header has {width} columns "
                    "(quote a name that contains a comma)", line)
        return
    fields = ((out.kind.id_field, columns[0]), (out.kind.name_field, columns[1]))
    missing = [field for field, col in fields if col >= len(row)]
    if missing:
        out.problem(f"missing {' and '.join(missing)} (the row has {len(row)} of the header's {width} columns)",
                    line)
    out.add(*(row[col] if col < len(row) else MISSING for _, col in fields), line)


def _csv_rows(text: str, out: _Collector) -> Iterator[tuple[int, list[str]]]:
    """(start line, cells) of each non-blank row; a malformed row is reported and skipped."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    next_line = 1
    while True:
        line = next_line
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            out.problem(f"unreadable CSV: {exc}", line)
            row = None
        next_line = reader.line_num + 1
        if row and any(cell.strip() for cell in row):
            yield line, row


def _parse_csv(text: str, out: _Collector) -> None:
    rows = _csv_rows(text, out)
    header = next(rows, None)
    if header is None:
        return
    columns = _csv_columns(header[1], header[0], out)
    if columns is None:
        return
    for line, row in rows:
        _csv_row(row, columns, len(header[1]), line, out)


# --- JSON ------------------------------------------------------------------------------------

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def _skip(text: str, pos: int) -> int:
    return _WS.match(text, pos).end()


def _item_positions(text: str, pos: int) -> list[int]:
    """Start offsets of the items of the (valid) JSON array starting at `pos`."""
    positions: list[int] = []
    pos = _skip(text, pos + 1)
    if text[pos] == "]":
        return positions
    while True:
        positions.append(pos)
        _, pos = _DECODER.raw_decode(text, pos)
        pos = _skip(text, pos)
        if text[pos] == "]":
            return positions
        pos = _skip(text, pos + 1)


def _member_positions(text: str, pos: int) -> dict[str, int]:
    """Start offsets of the values of the (valid) JSON object starting at `pos`, by key."""
    positions: dict[str, int] = {}
    pos = _skip(text, pos + 1)
    if text[pos] == "}":
        return positions
    while True:
        key, pos = _DECODER.raw_decode(text, pos)
        pos = _skip(text, _skip(text, pos) + 1)
        positions[key] = pos
        _, pos = _DECODER.raw_decode(text, pos)
        pos = _skip(text, pos)
        if text[pos] == "}":
            return positions
        pos = _skip(text, pos + 1)


def _line_finder(text: str) -> Callable[[int], int]:
    breaks = [i for i, char in enumerate(text) if char == "\n"]
    return lambda pos: bisect.bisect_left(breaks, pos) + 1


def _json_array(text: str, data: Any, out: _Collector) -> tuple[list, int] | None:
    """The array of records and its offset: the top-level array or `{"templates": [...]}`."""
    kind = out.kind
    start = _skip(text, 0)
    if isinstance(data, list):
        return data, start
    expected = f"a JSON array of {kind.plural} or an object {{\"{kind.plural}\": [...]}}"
    if not isinstance(data, dict):
        out.problem(f"expected {expected}, got {type(data).__name__}", 1)
        return None
    keys = [k for k in data if normalise(k) == kind.plural]
    if len(keys) != 1 or not isinstance(data[keys[0]], list):
        out.problem(f"expected {expected}", 1)
        return None
    return data[keys[0]], _member_positions(text, start)[keys[0]]


def _json_item(item: Any, line: int, index: int, out: _Collector) -> None:
    kind = out.kind
    if not isinstance(item, dict):
        out.problem(f"expected an object with {kind.id_field} and {kind.name_field}, got {_show(item)}", line, index)
        return
    values = []
    for field, accepted in ((kind.id_field, kind.id_keys()), (kind.name_field, kind.name_keys())):
        keys = [k for k in item if normalise(k) in accepted]
        if not keys:
            out.problem(f"missing {field}", line, index)
        elif len(keys) > 1:
            out.problem(f"{field} given {len(keys)} times: " + ", ".join(keys), line, index)
        values.append(item[keys[0]] if len(keys) == 1 else MISSING)
    out.add(values[0], values[1], line, index)


def _parse_json(text: str, out: _Collector) -> None:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        out.problem(f"not valid JSON: {exc.msg} (column {exc.colno})", exc.lineno)
        return
    found = _json_array(text, data, out)
    if found is None:
        return
    items, offset = found
    line_of = _line_finder(text)
    for index, (item, pos) in enumerate(zip(items, _item_positions(text, offset))):
        _json_item(item, line_of(pos), index, out)


# --- batching and sending --------------------------------------------------------------------

def batches(records: Sequence[Record], size: int = MAX_BATCH) -> list[list[Record]]:
    """`records` in file order, cut into lists of at most `size` (1..100)."""
    if not 1 <= size <= MAX_BATCH:
        raise ValueError(f"batch size must be between 1 and {MAX_BATCH}")
    return [list(records[i:i + size]) for i in range(0, len(records), size)]


def call_path(kind: RecordKind, params: Mapping[str, Any] | None = None, add: bool = True) -> str:
    """The request line of a call, relative to the API base: `POST /integrations/AddChannelTemplates?ChannelID=504`."""
    function = kind.add_function if add else kind.list_function
    query = f"?{urlencode(params)}" if params else ""
    return f"{'POST' if add else 'GET'} /{kind.category}/{function}{query}"


@dataclass(frozen=True)
class Progress:
    """Where a sync stands after a successful call."""

    kind: RecordKind
    sent: int
    total: int
    call: int
    calls: int

    def __str__(self) -> str:
        return f"sent {self.sent}/{self.kind.count(self.total)} (call {self.call} of {self.calls})"


@dataclass(frozen=True)
class SyncResult:
    """A finished sync."""

    kind: RecordKind
    sent: int
    calls: int


class SyncFailed(Exception):
    """A call of a sync failed for good; `sent` records went out before it."""

    def __init__(self, kind: RecordKind, sent: int, total: int, call: int, calls: int, error: Exception):
        self.kind, self.sent, self.total, self.call, self.calls, self.error = kind, sent, total, call, calls, error
        reason = error.reason if isinstance(error, OptimoveError) else f"{type(error).__name__}: {error}"
        if sent:
            after = (f"{sent} of {kind.count(total)} were sent before it, in {call - 1} call(s). Running the "
                     f"same command again is safe: Optimove stores {kind.plural} by {kind.id_field}, so the "
                     "batches already sent are simply sent again.")
        else:
            after = f"None of the {kind.count(total)} were sent; run the same command again once the cause is fixed."
        super().__init__(f"{kind.add_function} call {call} of {calls} failed: {reason}\n{after}")


def call_with_retry(call: Callable[[], Any], *, attempts: int = 3, max_wait: float = 60.0,
                    sleep: Callable[[float], None] = time.sleep) -> Any:
    """Run `call` (an Optimove request), waiting out our rate limiter and retrying temporary errors.

    `RateLimited` (nothing was sent) is waited out for up to `max_wait` seconds in all;
    429/5xx/network errors are retried with backoff up to `attempts` tries in all;
    `PermanentError` is raised at once.
    """
    waited = 0.0
    attempt = 0
    while True:
        try:
            return call()
        except RateLimited as exc:
            if waited + exc.wait_seconds > max_wait:
                raise
            sleep(exc.wait_seconds)
            waited += exc.wait_seconds
        except TemporaryError as exc:
            attempt += 1
            if attempt >= attempts:
                raise
            sleep(backoff(attempt - 1, base=1.0, cap=10.0, retry_after=exc.retry_after, floor=0.5))


def sync_records(client, kind: RecordKind, records: Sequence[Record], params: Mapping[str, Any] | None = None,
                 *, progress: Callable[[Progress], None] | None = None, attempts: int = 3,
                 sleep: Callable[[float], None] = time.sleep) -> SyncResult:
    """POST `records` to `kind.add_function` in batches of `kind.batch_size`, in file order.

    Calls `progress` after each successful call. Raises `SyncFailed` at the first call that fails
    for good (a rejected batch, a temporary error that outlasted `attempts`, or any other error
    such as an unreachable Redis for the shared rate limit).
    """
    plan = batches(records, kind.batch_size)
    sent = 0
    for number, batch in enumerate(plan, start=1):
        body = [kind.to_api(r) for r in batch]
        try:
            call_with_retry(lambda: client.post(kind.category, kind.add_function, body, params),
                            attempts=attempts, sleep=sleep)
        except OptimoveError as exc:
            raise SyncFailed(kind, sent, len(records), number, len(plan), exc) from None
        except Exception as exc:  # e.g. the Redis of the shared rate limit is down: still say how far we got
            raise SyncFailed(kind, sent, len(records), number, len(plan), exc) from exc
        sent += len(batch)
        if progress:
            progress(Progress(kind, sent, len(records), number, len(plan)))
    return SyncResult(kind, sent, len(plan))


def list_records(client, kind: RecordKind, params: Mapping[str, Any] | None = None, *, attempts: int = 3,
                 sleep: Callable[[float], None] = time.sleep) -> list[dict]:
    """GET `kind.list_function`: the stored records as Optimove returns them (an empty reply is [])."""
    data = call_with_retry(lambda: client.get(kind.category, kind.list_function, params),
                           attempts=attempts, sleep=sleep)
    if data is None:
        return []
    if not isinstance(data, list):
        raise PermanentError(f"{kind.list_function}: expected a JSON array, got {type(data).__name__}", 200)
    return data
