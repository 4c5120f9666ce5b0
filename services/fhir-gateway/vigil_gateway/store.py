"""The Store port: what the gateway needs from a database, and the semantics every adapter shares.

Adapters: `sqlite_store.SqliteStore` (embedded default) and `postgres_store.PostgresStore`, both
subclasses of `SqlStore` below, which holds every SQL statement (written once, `?` placeholders,
rewritten to `%s` for psycopg). Versioning rules (https://hl7.org/fhir/R4/http.html#versioning):

* the store owns `meta.versionId` (starting at "1") and `meta.lastUpdated` (UTC instant);
  values sent by producers are ignored;
* an incoming resource whose content, ignoring `meta.versionId` and `meta.lastUpdated`, equals the
  stored one is `unchanged` (no new version): redelivery from the bus is harmless;
* different content replaces it with versionId + 1 (`updated`); every version is kept in
  resource_history (vread, _history).

Search (https://hl7.org/fhir/R4/search.html) runs on the index tables of migration 0002
(idx_token, idx_reference, idx_date, idx_string, idx_quantity; see fhirindex.py). A search whose filters include
one exact token (system|code) is driven from idx_token, with the patient reference and the `date`
range denormalised on the token row, so `Observation?subject=X&code=S|C&date=ge...` is a single
index range scan in index order (no sort, no table scan); since migration 0003 that index also carries
date_low, so the scan reads no idx_token row, and the total is counted on idx_token alone. Paging is by
offset *within a snapshot*: the first page records the highest creation sequence (`_snapshot`), later
pages only see resources created up to it, so rows arriving meanwhile never shift or duplicate entries
across pages.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import threading
import uuid
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import orjson

from vigil.ids import is_fhir_id
from vigil_gateway.fhirindex import (
    RESOURCE_COLUMN_QUANTITY,
    SEARCH_PARAMS,
    WRITABLE_TYPES,
    IndexRows,
    Param,
    format_utc,
    index_rows,
    normalise_reference,
    quantity_rows,
)

__all__ = [
    "DateValue",
    "Filter",
    "InvalidResource",
    "PreconditionFailed",
    "SearchQuery",
    "SearchResult",
    "SqlStore",
    "Store",
    "TokenFilter",
    "UpsertCounts",
    "WriteGate",
    "WriteResult",
    "canonical_json",
    "check_resource",
    "content_hash",
    "format_utc",
    "normalise_date",
    "normalise_reference",
    "now_instant",
]


class InvalidResource(ValueError):
    """A resource that can never be stored (no resourceType, bad id...): retrying will not help."""


class PreconditionFailed(Exception):
    """If-Match mismatch, or a conditional create matching several resources (HTTP 412)."""


@dataclass(frozen=True, slots=True)
class UpsertCounts:
    new: int = 0
    updated: int = 0
    unchanged: int = 0

    @property
    def total(self) -> int:
        return self.new + self.updated + self.unchanged


@dataclass(frozen=True, slots=True)
class TokenFilter:
    """One token: system None = any system, '' = no system; code None = any code."""

    system: str | None
    code: str | None


@dataclass(frozen=True, slots=True)
class DateValue:
    prefix: str  # eq ne lt gt le ge sa eb ap
    low: str
    high: str


@dataclass(frozen=True, slots=True)
class NumberValue:
    """A number or quantity search value (https://hl7.org/fhir/R4/search.html#number, #quantity): the
    prefix, the number, the range its precision implies, [low, high) (100 -> [99.5, 100.5)), and for a
    quantity the unit: system and code (system '' = the `number||code` form, code matching code or
    unit; both None = any unit)."""

    prefix: str  # eq ne lt gt le ge sa eb ap
    value: float
    low: float
    high: float
    system: str | None = None
    code: str | None = None


@dataclass(frozen=True, slots=True)
class Filter:
    """One search parameter occurrence: values are OR-ed; filters are AND-ed.

    name: a Param name of the type, or `_id` / `_lastUpdated`. modifier: None, 'missing', 'not',
    'exact', 'contains', or a resource type (reference type modifier, already applied to values).
    values: TokenFilter (token), 'Type/id' (reference), DateValue (date), str (string, _id), NumberValue
    (number, quantity), bool (missing).
    """

    name: str
    modifier: str | None
    values: tuple


@dataclass(frozen=True)
class SearchQuery:
    resource_type: str
    filters: tuple[Filter, ...] = ()
    sort: tuple[tuple[str, bool], ...] = ()  # (key, descending); () = default (date desc, id)
    count: int = 50
    offset: int = 0
    snapshot: int | None = None
    total: str = "accurate"  # accurate | none | estimate (treated as accurate)
    include: tuple[tuple[str, str, str | None], ...] = ()     # (source type, param, target type)
    revinclude: tuple[tuple[str, str, str | None], ...] = ()  # (source type, param, target type)


class SearchResult:
    """A page of matches. The store hands over each match's stored JSON (`raw`, bytes, in order) and
    `resources` decodes it only when something reads the dicts (compartment filter, _elements,
    _include, _pretty), so a plain search page is written into the response as stored (app.py)."""

    __slots__ = ("_decode", "_resources", "has_more", "included", "raw", "snapshot", "total")

    def __init__(self, total: int | None, resources: list[dict] | None = None, has_more: bool = False,
                 snapshot: int = 0, included: list[dict] | None = None, *, raw: list[bytes] | None = None,
                 decode=orjson.loads):
        self.total, self.has_more, self.snapshot = total, has_more, snapshot
        self.included = included if included is not None else []
        self._resources = resources
        self.raw = raw if resources is None else None
        self._decode = decode

    @property
    def resources(self) -> list[dict]:
        if self._resources is None:
            self._resources = [self._decode(b) for b in self.raw or ()]
        return self._resources

    @resources.setter
    def resources(self, value: list[dict]) -> None:  # replaced: the stored JSON no longer matches
        self._resources, self.raw = value, None

    def keep(self, predicate) -> None:
        """Keep the matches predicate(resource dict) accepts, and their stored JSON with them."""
        resources, raw = self.resources, self.raw
        if raw is None:
            self._resources = [r for r in resources if predicate(r)]
            return
        kept = [(r, b) for r, b in zip(resources, raw, strict=True) if predicate(r)]
        self._resources, self.raw = [r for r, _ in kept], [b for _, b in kept]

    def __repr__(self) -> str:
        n = len(self._resources if self._resources is not None else self.raw or ())
        return f"SearchResult(total={self.total}, matches={n}, has_more={self.has_more}, snapshot={self.snapshot})"


@dataclass(frozen=True)
class WriteResult:
    outcome: str  # created | updated | unchanged | exists
    resource: dict


@runtime_checkable
class Store(Protocol):
    dialect: str

    def migrate(self) -> int: ...
    def upsert_many(self, resources: list[dict], *, stale_guard: bool = False, bulk: bool = False,
                    prepared: list[Prepared] | None = None) -> UpsertCounts: ...
    def write(self, resource: dict, *, create: bool, if_match: int | None = None,
              if_none_exist: SearchQuery | None = None, outbox: bool = True) -> WriteResult: ...
    def read(self, resource_type: str, resource_id: str) -> dict | None: ...
    def vread(self, resource_type: str, resource_id: str, version: int) -> dict | None: ...
    # read/vread from the event loop (the gateway's read path): the same answers, no worker-thread hop
    async def read_async(self, resource_type: str, resource_id: str) -> dict | None: ...
    async def vread_async(self, resource_type: str, resource_id: str, version: int) -> dict | None: ...
    def history(self, resource_type: str, resource_id: str | None, *, count: int, offset: int,
                since: str | None = None, snapshot: str | None = None) -> tuple[int, list[tuple[str, dict]]]: ...
    def search_query(self, query: SearchQuery) -> SearchResult: ...
    def search(self, resource_type: str, subject: str | None = None, code: list[TokenFilter] | None = None,
               count: int = 50, offset: int = 0) -> tuple[int, list[dict]]: ...
    def outbox_pending(self, limit: int = 100) -> list[tuple[int, str, str, int, dict]]: ...
    def outbox_done(self, seqs: list[int]) -> None: ...
    def ping(self) -> bool: ...
    def close(self) -> None: ...


# --- shared helpers ---------------------------------------------------------------------------------

def check_resource(resource: object) -> tuple[str, str]:
    """(resourceType, id) of a storable resource, or InvalidResource."""
    if not isinstance(resource, dict):
        raise InvalidResource("a resource must be a JSON object")
    rtype, rid = resource.get("resourceType"), resource.get("id")
    if not isinstance(rtype, str) or not rtype.isalpha() or not rtype[:1].isupper():
        raise InvalidResource(f"invalid resourceType {rtype!r}")
    if not isinstance(rid, str) or not is_fhir_id(rid):
        raise InvalidResource(f"{rtype}: invalid id {rid!r}")
    meta = resource.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise InvalidResource(f"{rtype}/{rid}: meta must be an object")
    return rtype, rid


def content_hash(resource: dict) -> str:
    """sha256 of the canonical JSON of the resource without the store-owned meta elements."""
    return hashlib.sha256(canonical_json(resource)).hexdigest()


def without_store_meta(resource: dict) -> dict:
    """A shallow copy of the resource without meta.versionId and meta.lastUpdated (the store sets them),
    and without `meta` when nothing else is in it."""
    body = dict(resource)
    meta = body.get("meta")
    if isinstance(meta, dict):
        meta = {k: v for k, v in meta.items() if k not in ("versionId", "lastUpdated")}
        if meta:
            body["meta"] = meta
        else:
            body.pop("meta")
    return body


def canonical_json(resource: dict) -> bytes:
    """The bytes content_hash hashes: compact JSON, keys sorted, without meta.versionId/lastUpdated."""
    body = without_store_meta(resource)
    try:
        return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    except TypeError as exc:
        raise InvalidResource(f"not JSON-serialisable: {exc}") from exc


def now_instant() -> str:
    """The current UTC instant as format_utc writes it (isoformat: the same text for years >= 1000,
    several times cheaper than strftime; every search and write asks for it)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def normalise_date(value: object) -> str | None:
    """A FHIR dateTime/instant as a sortable UTC string; partial dates (2024, 2024-05) kept as given."""
    if not isinstance(value, str) or not value:
        return None
    if "T" not in value:
        return value
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        return value
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return format_utc(t)


@dataclass(slots=True)
class PreparedRow:
    resource_type: str
    id: str
    version_id: int
    last_updated: str
    content_hash: str
    body: dict
    index: IndexRows
    is_new: bool
    _json: str | None = None

    def body_json(self) -> str:
        """The stored JSON text, serialised once (the resources, history and outbox rows share it)."""
        if self._json is None:
            self._json = orjson.dumps(self.body).decode()
        return self._json


def _stamp(resource: dict, rtype: str, rid: str, version: int, last_updated: str) -> dict:
    meta = dict(resource.get("meta") or {})
    meta["versionId"] = str(version)
    meta["lastUpdated"] = last_updated
    body = {"resourceType": rtype, "id": rid, "meta": meta}
    body.update((k, v) for k, v in resource.items() if k not in ("resourceType", "id", "meta"))
    return body


@dataclass(slots=True)
class Prepared:
    """What the write path derives from a resource alone, before any transaction: its key, its
    content_hash and its index rows. index_rows reads no `meta`, so the rows of the resource are those
    of the body the store stamps (meta.versionId/lastUpdated). The bus consumer computes these while
    the previous transaction runs (prepare_resources in its decode thread), not inside the next one."""
    key: tuple[str, str]
    digest: str
    index: IndexRows


def prepare_resources(resources: list[dict]) -> list[Prepared]:
    """Prepared of every resource, in order (InvalidResource for the first one not storable)."""
    return [Prepared(check_resource(r), content_hash(r), index_rows(r)) for r in resources]


def plan_upsert(resources: list[dict], existing: dict[tuple[str, str], tuple[int, str]], last_updated: str,
                *, stale_guard: bool = False, prepared: list[Prepared] | None = None,
                ) -> tuple[UpsertCounts, list[PreparedRow], list[PreparedRow]]:
    """Apply the versioning rules to a batch, in order. Returns counts, the final row per key and every
    new version (for history). `stale_guard`: a Patient/Encounter carrying meta.versionId not above
    the stored version is an echo of an older write (our own bus publication) and is `unchanged`.
    `prepared`: prepare_resources(resources), computed earlier (else computed here)."""
    new = updated = unchanged = 0
    state = dict(existing)
    rows: dict[tuple[str, str], PreparedRow] = {}
    versions: list[PreparedRow] = []
    if prepared is not None and len(prepared) != len(resources):
        raise ValueError("prepared must hold one entry per resource")
    for i, resource in enumerate(resources):
        if prepared is None:
            key = check_resource(resource)
            digest = content_hash(resource)
            index = None
        else:
            key, digest, index = prepared[i].key, prepared[i].digest, prepared[i].index
        rtype, rid = key
        prior = state.get(key)
        if prior is not None and prior[1] == digest:
            unchanged += 1
            continue
        if stale_guard and prior is not None and rtype in WRITABLE_TYPES:
            vid = str((resource.get("meta") or {}).get("versionId") or "")
            if vid.isdigit() and int(vid) <= prior[0]:
                unchanged += 1
                continue
        version = 1 if prior is None else prior[0] + 1
        if prior is None:
            new += 1
        else:
            updated += 1
        body = _stamp(resource, rtype, rid, version, last_updated)
        is_new = key not in existing
        row = PreparedRow(rtype, rid, version, last_updated, digest, body,
                          index_rows(body) if index is None else index, is_new)
        rows[key] = row
        versions.append(row)
        state[key] = (version, digest)
    return UpsertCounts(new, updated, unchanged), list(rows.values()), versions


def chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


class WriteGate:
    """Who starts the next write transaction: every other writer before a bus batch.

    The adapters write through one connection, one transaction at a time. Without an order, a REST
    create arriving while the bus consumer catches up a backlog waits behind batch after batch (a
    thread lock is not fair: the consumer's threads take it again as soon as they release it). Here a
    `bulk` transaction (a bus batch, `upsert_many(..., bulk=True)`) starts only when no other writer is
    waiting, so a REST write (or an outbox/audit write) waits at most for the bus transaction already
    running; the consumer keeps those short (consumer.BusConsumer.max_tx_resources). Bus batches are
    not starved by REST traffic in practice: they go whenever no REST write is queued. Reentrant per
    thread (a transaction that nests another keeps the gate)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._urgent = 0  # non-bulk writers waiting

    @contextlib.contextmanager
    def hold(self, *, bulk: bool = False):
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
            else:
                if not bulk:
                    self._urgent += 1
                try:
                    while self._owner is not None or (bulk and self._urgent):
                        self._cond.wait()
                finally:
                    if not bulk:
                        self._urgent -= 1
                self._owner, self._depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if self._depth == 0:
                    self._owner = None
                    self._cond.notify_all()

    @property
    def waiting(self) -> int:
        """Non-bulk writers waiting for the gate now."""
        return self._urgent


# --- SQL for search ---------------------------------------------------------------------------------

_MIN_DATE, _MAX_DATE = "0001-01-01T00:00:00.000000Z", "9999-12-31T23:59:59.999999Z"


def _date_sql(lo: str, hi: str, v: DateValue, now: dt.datetime) -> tuple[str, list]:
    """Predicate on a stored inclusive range [lo, hi] for a search value (https://hl7.org/fhir/R4/search.html#prefix)."""
    p, sl, sh = v.prefix, v.low, v.high
    if p == "eq":
        return f"({lo} >= ? AND {hi} <= ?)", [sl, sh]
    if p == "ne":
        return f"NOT ({lo} >= ? AND {hi} <= ?)", [sl, sh]
    if p == "gt":
        return f"{hi} > ?", [sh]
    if p == "lt":
        return f"{lo} < ?", [sl]
    if p == "ge":  # above the value, or within it; the first conjunct is what an index range uses
        return f"({hi} >= ? AND ({hi} > ? OR ({lo} >= ? AND {hi} <= ?)))", [sl, sh, sl, sh]
    if p == "le":
        return f"({lo} <= ? AND ({lo} < ? OR ({lo} >= ? AND {hi} <= ?)))", [sh, sl, sl, sh]
    if p == "sa":
        return f"{lo} > ?", [sh]
    if p == "eb":
        return f"{hi} < ?", [sl]
    if p == "ap":  # within 10% of the distance between the value and now (at least the value's precision)
        t_lo = dt.datetime.fromisoformat(sl)
        t_hi = dt.datetime.fromisoformat(sh)
        gap = abs(now - t_lo) * 0.1
        a_lo, a_hi = format_utc(t_lo - gap), format_utc(t_hi + gap)
        return f"({hi} >= ? AND {lo} <= ?)", [a_lo, a_hi]
    raise ValueError(f"unknown date prefix {p!r}")


def _number_sql(col: str, v: NumberValue) -> tuple[str, list]:
    """A stored value (an exact number) against a search value: eq, ne and ap use the search value's
    implied range (ap widened to +-10 % of it); the other prefixes compare with the number itself, as
    R4 says for prefixes other than eq/ne/ap; for a single stored value sa is gt and eb is lt."""
    p = v.prefix
    if p == "eq":
        return f"({col} >= ? AND {col} < ?)", [v.low, v.high]
    if p == "ne":
        return f"({col} < ? OR {col} >= ?)", [v.low, v.high]
    if p == "ap":
        spread = abs(v.value) * 0.1
        return f"({col} >= ? AND {col} <= ?)", [min(v.low, v.value - spread), max(v.high, v.value + spread)]
    op = {"gt": ">", "sa": ">", "lt": "<", "eb": "<", "ge": ">=", "le": "<="}[p]
    return f"{col} {op} ?", [v.value]


def _unit_sql(prefix: str, v: NumberValue) -> tuple[str, list]:
    """The unit condition; `prefix` + system/code/unit are the columns ("x." or "r.value_")."""
    if v.code is None:
        return "", []
    if v.system:
        return f" AND {prefix}system=? AND {prefix}code=?", [v.system, v.code]
    return f" AND ({prefix}code=? OR {prefix}unit=?)", [v.code, v.code]


def _token_match(alias: str, t: TokenFilter) -> tuple[str, list]:
    parts, params = [], []
    if t.code is not None:
        parts.append(f"{alias}.value=?")
        params.append(t.code)
    if t.system is not None:
        parts.append(f"{alias}.system=?")
        params.append(t.system)
    return "(" + " AND ".join(parts or ["1=1"]) + ")", params


_IDX_TABLE = {"token": "idx_token", "reference": "idx_reference", "date": "idx_date", "string": "idx_string",
              "number": "idx_quantity", "quantity": "idx_quantity"}
INDEX_TABLES = tuple(dict.fromkeys(_IDX_TABLE.values()))  # every index table, once
_NO_VALUE = (None, None, None, None)  # resources.value_* of a resource without RESOURCE_COLUMN_QUANTITY


class _SqlBuilder:
    """FROM/WHERE/ORDER BY for a SearchQuery. `nulls` is ' NULLS LAST' (PostgreSQL) or '' (SQLite,
    where DESC already sorts NULLs last)."""

    def __init__(self, q: SearchQuery, dialect: str):
        self.q, self.dialect = q, dialect
        self.params_ = SEARCH_PARAMS[q.resource_type]
        self.where: list[str] = ["r.resource_type=?"]
        self.args: list = [q.resource_type]
        self.now = dt.datetime.now(dt.UTC)
        self.driver: Filter | None = None
        self.uses_r = False  # a condition reads a resources column (the driven count then needs the join)
        self._choose_driver()

    def _choose_driver(self) -> None:
        if self.q.sort not in ((), (("date", True),)):
            return
        for f in self.q.filters:
            p = self.params_.get(f.name)
            if (p is not None and p.kind == "token" and f.modifier is None and len(f.values) == 1
                    and f.values[0].system is not None and f.values[0].code is not None):
                self.driver = f
                return

    def build(self) -> tuple[str, str, list, str]:
        """(from, where, args, order by)"""
        q, d = self.q, self.driver
        nulls = " NULLS LAST" if self.dialect == "postgresql" else ""
        if d is not None:
            frm = "idx_token t JOIN resources r ON r.resource_type=t.resource_type AND r.id=t.resource_id"
            t0 = d.values[0]
            self.where += ["t.resource_type=?", "t.param=?", "t.value=?", "t.system=?"]
            self.args += [q.resource_type, d.name, t0.code, t0.system]
            order = f"t.date_high DESC{nulls}, t.resource_id"
        else:
            frm = "resources r"
            order = None
        for f in q.filters:
            if f is d:
                continue
            self._filter(f)
        if q.snapshot is not None:
            self.where.append("r.created_seq <= ?")
            self.args.append(q.snapshot)
            self.uses_r = True
        if order is None:
            order = self._order(nulls)
        return frm, " AND ".join(self.where), self.args, order

    def count_parts(self) -> tuple[str, str, list]:
        """(from, where, args) for the total, after build(). Driven by a token with no condition on a
        resources column, it counts idx_token rows alone (an index-only scan): every idx_token row has
        exactly one resources row (written and deleted in the same transaction), so the join adds
        nothing to the count."""
        if self.driver is not None and not self.uses_r:
            return "idx_token t", " AND ".join(self.where[1:]), self.args[1:]
        frm = ("idx_token t JOIN resources r ON r.resource_type=t.resource_type AND r.id=t.resource_id"
               if self.driver is not None else "resources r")
        return frm, " AND ".join(self.where), self.args

    def _order(self, nulls: str) -> str:
        if not self.q.sort:
            return f"r.date_high DESC{nulls}, r.id"
        keys = []
        for key, desc in self.q.sort:
            col = {"_id": "r.id", "_lastUpdated": "r.last_updated",
                   "date": "r.date_high" if desc else "r.date"}[key]
            if col == "r.id":
                keys.append(col + (" DESC" if desc else ""))
            else:
                keys.append(col + (f" DESC{nulls}" if desc else " NULLS LAST"))
        if not any(k == "_id" for k, _ in self.q.sort):
            keys.append("r.id")
        return ", ".join(keys)

    def _in(self, sql: str, args: list, negate: bool = False) -> None:
        own = "t.resource_id" if self.driver is not None else "r.id"  # equal when driven (the join)
        self.where.append(f"{own} {'NOT IN' if negate else 'IN'} ({sql})")
        self.args += args

    def _filter(self, f: Filter) -> None:
        rt = self.q.resource_type
        if f.name == "_id":
            if f.modifier == "missing":
                if f.values[0]:
                    self.where.append("1=0")
                return
            own = "t.resource_id" if self.driver is not None else "r.id"
            self.where.append(own + " IN (" + ",".join("?" * len(f.values)) + ")")
            self.args += list(f.values)
            return
        if f.name == "_lastUpdated":
            ors, args = [], []
            for v in f.values:
                sql, a = _date_sql("r.last_updated", "r.last_updated", v, self.now)
                ors.append(sql)
                args += a
            self.where.append("(" + " OR ".join(ors) + ")")
            self.args += args
            self.uses_r = True
            return
        p: Param = self.params_[f.name]
        table = _IDX_TABLE[p.kind]
        base = f"SELECT x.resource_id FROM {table} x WHERE x.resource_type=? AND x.param=?"
        base_args = [rt, p.name]
        if f.modifier == "missing":
            if p.kind == "date" and p.name == "date":  # resources.date_high holds it (no idx_date rows)
                self.where.append("r.date_high IS NULL" if f.values[0] else "r.date_high IS NOT NULL")
                self.uses_r = True
                return
            if RESOURCE_COLUMN_QUANTITY.get(rt) == p.name:  # resources.value_num holds it
                self.where.append("r.value_num IS NULL" if f.values[0] else "r.value_num IS NOT NULL")
                self.uses_r = True
                return
            self._in(base, base_args, negate=bool(f.values[0]))
            return
        if p.kind == "token":
            ors, args = [], []
            for t in f.values:
                sql, a = _token_match("x", t)
                ors.append(sql)
                args += a
            self._in(base + " AND (" + " OR ".join(ors) + ")", base_args + args, negate=f.modifier == "not")
        elif p.kind == "reference":
            if (self.driver is not None and f.name in ("subject", "patient") and len(f.values) == 1
                    and _denormalised_subject(rt, f.name)):
                self.where.append("t.subject=?")
                self.args.append(f.values[0])
                return
            if len(f.values) == 1 and _denormalised_subject(rt, f.name):
                self.where.append("r.subject=?")
                self.args.append(f.values[0])
                self.uses_r = True
                return
            self._in(base + " AND x.target IN (" + ",".join("?" * len(f.values)) + ")",
                     base_args + list(f.values))
        elif p.kind == "date":
            if p.name == "date" and self.driver is not None:
                lo, hi, direct = "t.date_low", "t.date_high", True
            elif p.name == "date":
                lo, hi, direct = "r.date", "r.date_high", True
                self.uses_r = True
            else:
                lo, hi, direct = "x.low", "x.high", False
            ors, args = [], []
            for v in f.values:
                sql, a = _date_sql(lo, hi, v, self.now)
                ors.append(sql)
                args += a
            cond = "(" + " OR ".join(ors) + ")"
            if direct:
                # NULL-safe: a resource without a date matches no date filter
                self.where.append(f"{hi} IS NOT NULL AND {cond}")
                self.args += args
            else:
                self._in(base + " AND " + cond, base_args + args)
        elif p.kind in ("number", "quantity"):
            own = RESOURCE_COLUMN_QUANTITY.get(rt) == p.name  # the resources row's value_* columns
            ors, args = [], []
            for v in f.values:
                sql, a = _number_sql("r.value_num" if own else "x.value", v)
                unit, ua = _unit_sql("r.value_" if own else "x.", v)
                ors.append(f"({sql}{unit})")
                args += a + ua
            if own:
                self.where.append("(" + " OR ".join(ors) + ")")
                self.args += args
                self.uses_r = True
            else:
                self._in(base + " AND (" + " OR ".join(ors) + ")", base_args + args)
        elif p.kind == "string":
            ors, args = [], []
            for s in f.values:
                if f.modifier == "exact":
                    ors.append("x.exact=?")
                    args.append(s)
                elif f.modifier == "contains":
                    ors.append("x.norm LIKE ? ESCAPE '\\'")
                    args.append("%" + _like(s) + "%")
                else:
                    ors.append("x.norm LIKE ? ESCAPE '\\'")
                    args.append(_like(s) + "%")
            self._in(base + " AND (" + " OR ".join(ors) + ")", base_args + args)


def _like(s: str) -> str:
    from vigil_gateway.fhirindex import normalise_string
    return normalise_string(s).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _denormalised_subject(rtype: str, param: str) -> bool:
    """resources.subject / idx_token.subject hold this reference parameter's (single) value."""
    return (rtype, param) in {("Observation", "subject"), ("Observation", "patient"),
                              ("RiskAssessment", "subject"), ("RiskAssessment", "patient"),
                              ("Encounter", "subject"), ("Encounter", "patient"), ("Device", "patient")}


# --- the shared SQL store ---------------------------------------------------------------------------

class SqlStore:
    """Everything except connections, transactions and dialect details (see the two subclasses)."""

    dialect = "?"
    body_col = "r.body"
    json_param = "?"        # PostgreSQL: ?::json
    in_chunk = 400
    revinclude_max = 1000
    _gate: WriteGate  # set by the adapter's __init__

    # subclasses provide: _open_write_tx() / _read_tx() context managers yielding an object with
    # q(sql, args) -> rows, many(sql, seq), and _next_seqs(tx, n) -> list[int], _decode(text) -> dict,
    # _lock_key(tx, key) (serialise conditional creates across processes; no-op for SQLite).
    # Writes go through _write_tx(bulk=...), which orders them with the WriteGate first.

    # --- writes -----------------------------------------------------------------------------------

    def _existing(self, tx, keys: list[tuple[str, str]], *,
                  lock: bool = True) -> dict[tuple[str, str], tuple[int, str]]:
        """{key: (version_id, content_hash)} of the stored keys; lock: hold row locks until commit."""
        raise NotImplementedError

    def _apply(self, tx, rows: list[PreparedRow], versions: list[PreparedRow], *, outbox: bool = False) -> None:
        """Write a planned batch: one statement (or COPY) per table, whatever the batch size."""
        if not rows:
            return
        new_rows = [r for r in rows if r.is_new]
        seqs = iter(self._next_seqs(tx, len(new_rows)) if new_rows else ())
        old = [(r.resource_type, r.id) for r in rows if not r.is_new]
        if old:
            self._delete_index(tx, old)
        # one new version per key (the usual batch): versions are exactly `rows`, and the adapter may
        # write their history rows together with the resources (PostgreSQL: one statement)
        with_history = len(versions) == len(rows)
        done = self._upsert_resources(tx, [
            (r.resource_type, r.id, r.version_id, r.last_updated, r.index.subject,
             r.index.date[0] if r.index.date else None, r.index.date[1] if r.index.date else None,
             r.content_hash, r.body_json(), next(seqs) if r.is_new else None,
             *(r.index.value or _NO_VALUE)) for r in rows],
            with_history=with_history)
        if not done:
            self._append(tx, "resource_history",
                         ("resource_type", "id", "version_id", "last_updated", "method", "body"),
                         [(v.resource_type, v.id, v.version_id, v.last_updated,
                           "POST" if v.version_id == 1 else "PUT", v.body_json()) for v in versions], json_col=5)
        self._insert_index(tx, rows)
        if outbox:
            self._append(tx, "outbox", ("resource_type", "id", "version_id", "body"),
                         [(r.resource_type, r.id, r.version_id, r.body_json()) for r in rows], json_col=3)

    # Write primitives; PostgresStore replaces them with COPY and array-parameter statements.

    _UPSERT_RESOURCES = (
        "INSERT INTO resources (resource_type, id, version_id, last_updated, subject, date, date_high, "
        "content_hash, body, created_seq, value_num, value_system, value_code, value_unit) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, {jp}, ?, ?, ?, ?, ?) "
        "ON CONFLICT (resource_type, id) DO UPDATE SET version_id=excluded.version_id, "
        "last_updated=excluded.last_updated, subject=excluded.subject, date=excluded.date, "
        "date_high=excluded.date_high, content_hash=excluded.content_hash, body=excluded.body, "
        "value_num=excluded.value_num, value_system=excluded.value_system, value_code=excluded.value_code, "
        "value_unit=excluded.value_unit")

    def _upsert_resources(self, tx, values: list[tuple], *, with_history: bool = False) -> bool:
        """Insert or replace current versions (created_seq is None for rows that exist: not updated).
        True when the history rows of these versions were written too (only asked when with_history)."""
        tx.many(self._UPSERT_RESOURCES.format(jp=self.json_param), values)
        return False

    def _append(self, tx, table: str, columns: tuple[str, ...], values: list[tuple],
                json_col: int | None = None) -> None:
        """Plain INSERT of many rows (history, index and outbox rows: no conflict is possible)."""
        if values:
            marks = ", ".join(self.json_param if i == json_col else "?" for i in range(len(columns)))
            tx.many(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", values)

    def _delete_index(self, tx, keys: list[tuple[str, str]]) -> None:
        for table in INDEX_TABLES:
            tx.many(f"DELETE FROM {table} WHERE resource_type=? AND resource_id=?", keys)

    def _insert_index(self, tx, rows: list[PreparedRow]) -> None:
        toks, refs, dates, strs, qtys = [], [], [], [], []
        for r in rows:
            ix = r.index
            rt, rid = r.resource_type, r.id
            lo, hi = ix.date if ix.date else (None, None)
            toks += [(rt, rid, p, s, v, ix.subject, lo, hi) for p, s, v in ix.tokens]
            refs += [(rt, rid, p, t) for p, t in ix.refs]
            # the resource's own `date` is resources.date/date_high (searched there): no idx_date row
            dates += [(rt, rid, p, a, b) for p, a, b in ix.dates if p != "date"]
            strs += [(rt, rid, p, n, e) for p, n, e in ix.strings]
            qtys += [(rt, rid, *q) for q in quantity_rows(rt, ix)]  # value-quantity: resources.value_*
        self._append(tx, "idx_token", ("resource_type", "resource_id", "param", "system", "value", "subject",
                                       "date_low", "date_high"), toks)
        self._append(tx, "idx_reference", ("resource_type", "resource_id", "param", "target"), refs)
        self._append(tx, "idx_date", ("resource_type", "resource_id", "param", "low", "high"), dates)
        self._append(tx, "idx_string", ("resource_type", "resource_id", "param", "norm", "exact"), strs)
        self._append(tx, "idx_quantity", ("resource_type", "resource_id", "param", "value", "system", "code", "unit"),
                     qtys)

    def upsert_many(self, resources: list[dict], *, stale_guard: bool = False, bulk: bool = False,
                    prepared: list[Prepared] | None = None) -> UpsertCounts:
        """Store a batch in one transaction (versioning rules above). bulk=True: a bus batch, which
        yields to any other writer waiting (see WriteGate). `prepared`: prepare_resources(resources),
        when the caller computed it already (the bus consumer: off the write connection's time)."""
        if not resources:
            return UpsertCounts()
        if prepared is None:
            keys = list(dict.fromkeys(check_resource(r) for r in resources))  # all valid before the transaction
        elif len(prepared) != len(resources):
            raise ValueError("prepared must hold one entry per resource")
        else:
            keys = list(dict.fromkeys(p.key for p in prepared))
        with self._write_tx(bulk=bulk) as tx:
            existing = self._existing(tx, keys, lock=False)
            now = now_instant()
            counts, rows, versions = plan_upsert(resources, existing, now, stale_guard=stale_guard,
                                                 prepared=prepared)
            changing = [(r.resource_type, r.id) for r in rows if not r.is_new]
            if changing:
                # lock the rows about to get a new version (PostgreSQL: FOR UPDATE) so versions never
                # fork; a redelivered batch (all unchanged) takes no row locks at all
                locked = self._existing(tx, changing, lock=True)
                if any(locked.get(k) != existing.get(k) for k in changing):  # changed meanwhile: plan again
                    existing.update(locked)
                    counts, rows, versions = plan_upsert(resources, existing, now, stale_guard=stale_guard,
                                                         prepared=prepared)
            self._apply(tx, rows, versions)
            return counts

    def write(self, resource: dict, *, create: bool, if_match: int | None = None,
              if_none_exist: SearchQuery | None = None, outbox: bool = True) -> WriteResult:
        """REST create (create=True: the id is assigned here) or update (update-as-create allowed)."""
        resource = dict(resource)
        if create:
            resource["id"] = str(uuid.uuid4())
        rtype, rid = check_resource(resource)
        with self._write_tx() as tx:
            if if_none_exist is not None:
                self._lock_key(tx, f"{rtype}?{if_none_exist.filters!r}")
                found = self._search(tx, SearchQuery(rtype, if_none_exist.filters, count=2))
                if len(found.resources) > 1:
                    raise PreconditionFailed(f"If-None-Exist matches {len(found.resources)} {rtype} resources")
                if found.resources:
                    return WriteResult("exists", found.resources[0])
            existing = self._existing(tx, [(rtype, rid)])
            prior = existing.get((rtype, rid))
            if if_match is not None and (prior is None or prior[0] != if_match):
                have = "no current version" if prior is None else f"version {prior[0]}"
                raise PreconditionFailed(f"If-Match version {if_match} does not match ({have})")
            counts, rows, versions = plan_upsert([resource], existing, now_instant())
            if counts.unchanged:
                current = self._read_one(tx, rtype, rid)
                return WriteResult("unchanged", current)
            self._apply(tx, rows, versions, outbox=outbox)
            return WriteResult("created" if counts.new else "updated", rows[0].body)

    def outbox_pending(self, limit: int = 100) -> list[tuple[int, str, str, int, dict]]:
        with self._read_tx() as tx:
            rows = tx.q(f"SELECT seq, resource_type, id, version_id, {self.body_col.replace('r.', '')} "
                        "FROM outbox ORDER BY seq LIMIT ?", [limit])
        return [(s, t, i, v, self._decode(b)) for s, t, i, v, b in rows]

    def outbox_done(self, seqs: list[int]) -> None:
        if seqs:
            with self._write_tx() as tx:
                tx.many("DELETE FROM outbox WHERE seq=?", [(s,) for s in seqs])

    def _reindex_after_migrate(self, version: int) -> None:
        """What the migrations at `version` left for the store to compute in Python (both dialects'
        migrate() end here): 0002's full re-index, then 0005's added parameters."""
        if version >= 2:
            self._reindex_if_pending()
        if version >= 5:
            self._reindex_params()

    def _reindex_if_pending(self) -> None:
        """After migration 0002 on a database with data: compute created_seq and index rows."""
        with self._write_tx() as tx:
            if not tx.q("SELECT flag FROM reindex_pending"):
                return
            rows = tx.q(f"SELECT resource_type, id, {self.body_col} FROM resources r ORDER BY resource_type, id")
            prepared = []
            for rt, rid, body in rows:
                b = self._decode(body)
                meta = b.get("meta") or {}
                prepared.append(PreparedRow(rt, rid, int(meta.get("versionId", 1)), meta.get("lastUpdated", ""),
                                            "", b, index_rows(b), False))
            seqs = self._next_seqs(tx, len(prepared)) if prepared else []
            tx.many("UPDATE resources SET created_seq=?, subject=?, date=?, date_high=? WHERE resource_type=? AND id=?",
                    [(s, p.index.subject, p.index.date[0] if p.index.date else None,
                      p.index.date[1] if p.index.date else None, p.resource_type, p.id)
                     for p, s in zip(prepared, seqs, strict=True)])
            self._insert_index(tx, prepared)
            tx.q("DELETE FROM reindex_pending")

    def _reindex_params(self) -> None:
        """After a migration that added search parameters to stored types (reindex_params, 0005 on):
        the index rows of those parameters for the resources already stored, read in id order 2000
        at a time, in one transaction (a crash leaves reindex_params set: the next start redoes it)."""
        with self._write_tx() as tx:
            pending = tx.q("SELECT resource_type, param FROM reindex_params")
            if not pending:
                return
            by_type: dict[str, set[str]] = {}
            for rt, param in pending:
                by_type.setdefault(rt, set()).add(param)
            for rt, params in sorted(by_type.items()):
                for table in INDEX_TABLES:
                    tx.many(f"DELETE FROM {table} WHERE resource_type=? AND param=?", [(rt, p) for p in sorted(params)])
                last = ""
                while rows := tx.q(f"SELECT r.id, {self.body_col} FROM resources r WHERE r.resource_type=? "
                                   "AND r.id > ? ORDER BY r.id LIMIT 2000", [rt, last]):
                    prepared, values = [], []
                    for rid, body in rows:
                        ix = index_rows(self._decode(body))
                        only = IndexRows(ix.subject, ix.date, *([row for row in rows_ if row[0] in params]
                                                                for rows_ in (ix.tokens, ix.refs, ix.dates,
                                                                              ix.strings, ix.quantities)))
                        prepared.append(PreparedRow(rt, rid, 0, "", "", {}, only, False))
                        if RESOURCE_COLUMN_QUANTITY.get(rt) in params:
                            values.append((*(ix.value or _NO_VALUE), rt, rid))
                    self._insert_index(tx, prepared)
                    if values:
                        tx.many("UPDATE resources SET value_num=?, value_system=?, value_code=?, value_unit=? "
                                "WHERE resource_type=? AND id=?", values)
                    last = rows[-1][0]
            tx.q("DELETE FROM reindex_params")

    # --- reads ------------------------------------------------------------------------------------

    @property
    def read_sql(self) -> str:
        """read's one statement (`?` placeholders): the body of (resource_type, id)."""
        return f"SELECT {self.body_col} FROM resources r WHERE r.resource_type=? AND r.id=?"

    @property
    def vread_sql(self) -> str:
        """vread's one statement: the body of (resource_type, id, version_id)."""
        return (f"SELECT {self.body_col} FROM resource_history r WHERE r.resource_type=? AND r.id=? "
                "AND r.version_id=?")

    def _read_one(self, tx, rtype: str, rid: str) -> dict | None:
        rows = tx.q(self.read_sql, [rtype, rid])
        return self._decode(rows[0][0]) if rows else None

    def read(self, resource_type: str, resource_id: str) -> dict | None:
        with self._read_tx() as tx:
            return self._read_one(tx, resource_type, resource_id)

    def current_version(self, resource_type: str, resource_id: str) -> int | None:
        with self._read_tx() as tx:
            rows = tx.q("SELECT version_id FROM resources WHERE resource_type=? AND id=?",
                        [resource_type, resource_id])
        return rows[0][0] if rows else None

    def vread(self, resource_type: str, resource_id: str, version: int) -> dict | None:
        with self._read_tx() as tx:
            rows = tx.q(self.vread_sql, [resource_type, resource_id, version])
        return self._decode(rows[0][0]) if rows else None

    def history(self, resource_type: str, resource_id: str | None, *, count: int, offset: int,
                since: str | None = None, snapshot: str | None = None) -> tuple[int, list[tuple[str, dict]]]:
        """(total, [(method, version body)]) newest first; `snapshot` bounds last_updated for stable paging."""
        where, args = ["r.resource_type=?"], [resource_type]
        if resource_id is not None:
            where.append("r.id=?")
            args.append(resource_id)
        if since:
            where.append("r.last_updated >= ?")
            args.append(since)
        if snapshot:
            where.append("r.last_updated <= ?")
            args.append(snapshot)
        w = " AND ".join(where)
        with self._read_tx() as tx:
            total = tx.q(f"SELECT COUNT(*) FROM resource_history r WHERE {w}", args)[0][0]
            rows = tx.q(f"SELECT r.method, {self.body_col} FROM resource_history r WHERE {w} "
                        "ORDER BY r.last_updated DESC, r.id, r.version_id DESC LIMIT ? OFFSET ?",
                        [*args, count, offset]) if count > 0 else []
        return total, [(m, self._decode(b)) for m, b in rows]

    def search_sql(self, q: SearchQuery) -> tuple[str, list]:
        """The page query (for EXPLAIN in tests and benchmarks), in this driver's placeholder style."""
        frm, where, args, order = _SqlBuilder(q, self.dialect).build()
        return self._sql(f"SELECT {self.body_col} FROM {frm} WHERE {where} ORDER BY {order} LIMIT ? OFFSET ?"), \
            [*args, q.count + 1, q.offset]

    def count_sql(self, q: SearchQuery) -> tuple[str, list]:
        """The total's query as the general search path runs it (for EXPLAIN in tests)."""
        builder = _SqlBuilder(q, self.dialect)
        builder.build()
        frm, where, args = builder.count_parts()
        return self._sql(f"SELECT COUNT(*) FROM {frm} WHERE {where}"), args

    def _sql(self, sql: str) -> str:
        return sql

    def _search(self, tx, q: SearchQuery) -> SearchResult:
        builder = _SqlBuilder(q, self.dialect)
        frm, where, args, order = builder.build()
        snapshot = q.snapshot
        if snapshot is None:
            snapshot = tx.q("SELECT COALESCE(MAX(created_seq), 0) FROM resources")[0][0]
        total = None
        if q.total != "none":
            cfrm, cwhere, cargs = builder.count_parts()
            total = tx.q(f"SELECT COUNT(*) FROM {cfrm} WHERE {cwhere}", cargs)[0][0]
        rows = []
        if q.count > 0:
            rows = tx.q(f"SELECT {self.body_col} FROM {frm} WHERE {where} ORDER BY {order} LIMIT ? OFFSET ?",
                        [*args, q.count + 1, q.offset])
        has_more = len(rows) > q.count
        result = SearchResult(total, None, has_more, snapshot, raw=[self._raw(r[0]) for r in rows[:q.count]],
                              decode=self._decode)
        if result.raw and (q.include or q.revinclude):
            result.included = self._includes(tx, q, result.resources)
        return result

    def _includes(self, tx, q: SearchQuery, resources: list[dict]) -> list[dict]:
        out: dict[tuple[str, str], dict] = {}
        matched = {(r["resourceType"], r["id"]) for r in resources}
        ids = [r["id"] for r in resources]
        for src, param, target_type in q.include:
            targets: set[str] = set()
            for part in chunks(ids, self.in_chunk):
                rows = tx.q("SELECT target FROM idx_reference WHERE resource_type=? AND param=? AND resource_id IN ("
                            + ",".join("?" * len(part)) + ")", [src, param, *part])
                targets.update(t for (t,) in rows)
            by_type: dict[str, list[str]] = {}
            for t in targets:
                tt, _, tid = t.partition("/")
                if target_type is None or tt == target_type:
                    by_type.setdefault(tt, []).append(tid)
            for tt, tids in by_type.items():
                for part in chunks(sorted(tids), self.in_chunk):
                    for (b,) in tx.q(f"SELECT {self.body_col} FROM resources r WHERE r.resource_type=? AND r.id IN ("
                                     + ",".join("?" * len(part)) + ")", [tt, *part]):
                        res = self._decode(b)
                        key = (res["resourceType"], res["id"])
                        if key not in matched:
                            out[key] = res
        refs = [f"{r['resourceType']}/{r['id']}" for r in resources]
        for src, param, target_type in q.revinclude:
            targets = [x for x in refs if target_type is None or x.startswith(target_type + "/")]
            got = 0
            for part in chunks(targets, self.in_chunk):
                rows = tx.q(f"SELECT {self.body_col} FROM idx_reference x JOIN resources r ON "
                            "r.resource_type=x.resource_type AND r.id=x.resource_id WHERE x.resource_type=? AND "
                            "x.param=? AND x.target IN (" + ",".join("?" * len(part)) + ") ORDER BY r.id LIMIT ?",
                            [src, param, *part, self.revinclude_max - got])
                for (b,) in rows:
                    res = self._decode(b)
                    key = (res["resourceType"], res["id"])
                    if key not in matched:
                        out[key] = res
                got += len(rows)
                if got >= self.revinclude_max:
                    break
        return list(out.values())

    def search_query(self, query: SearchQuery) -> SearchResult:
        with self._read_tx() as tx:
            return self._search(tx, query)

    def search(self, resource_type: str, subject: str | None = None, code: list[TokenFilter] | None = None,
               count: int = 50, offset: int = 0) -> tuple[int, list[dict]]:
        """Convenience form of search_query: subject reference and OR-ed code tokens."""
        filters = []
        if subject is not None:
            filters.append(Filter("subject", None, (subject,)))
        if code:
            filters.append(Filter("code", None, tuple(code)))
        res = self.search_query(SearchQuery(resource_type, tuple(filters), count=count, offset=offset))
        return res.total, res.resources

    @contextlib.contextmanager
    def _write_tx(self, *, bulk: bool = False):
        """A write transaction, started in WriteGate order (bulk = a bus batch: last in line)."""
        with self._gate.hold(bulk=bulk), self._open_write_tx() as tx:
            yield tx

    # subclass hooks
    def _open_write_tx(self):
        raise NotImplementedError

    def _read_tx(self):
        raise NotImplementedError

    def _next_seqs(self, tx, n: int) -> list[int]:
        raise NotImplementedError

    def _decode(self, text) -> dict:
        return orjson.loads(text)

    def _raw(self, body) -> bytes:
        """A stored body as the JSON bytes a response carries (SQLite: the text the store wrote)."""
        return body.encode() if isinstance(body, str) else bytes(body)

    def _lock_key(self, tx, key: str) -> None:
        return None


class Tx:
    """A transaction handle over a DB-API connection/cursor with `?` placeholders."""

    def __init__(self, cur, placeholder: str = "?"):
        self.cur, self.ph = cur, placeholder

    def _s(self, sql: str) -> str:
        return sql if self.ph == "?" else sql.replace("%", "%%").replace("?", "%s")

    def q(self, sql: str, args: list | tuple = ()) -> list:
        self.cur.execute(self._s(sql), args)
        try:
            return self.cur.fetchall()
        except Exception:  # noqa: BLE001 - statement without a result set (psycopg raises)
            return []

    def many(self, sql: str, seq: list) -> None:
        if seq:
            self.cur.executemany(self._s(sql), seq)


