"""The Store port: what the gateway needs from a database, and the semantics every adapter shares.

Adapters: `sqlite_store.SqliteStore` (embedded default) and `postgres_store.PostgresStore`. Both keep
the current version of each resource with these rules (https://hl7.org/fhir/R4/http.html#versioning,
https://hl7.org/fhir/R4/resource.html#Meta):

* the store owns `meta.versionId` (starting at "1") and `meta.lastUpdated` (UTC instant);
  values sent by producers are ignored;
* an incoming resource whose content, ignoring `meta.versionId` and `meta.lastUpdated`, equals the
  stored one is `unchanged` (no new version): redelivery from the bus is harmless;
* different content replaces it with versionId + 1 (`updated`).

Search (https://hl7.org/fhir/R4/search.html) is by subject reference and by `code` tokens, newest
effective/occurrence date first, then by id; `total` is exact.
"""
from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import orjson

from vigil.ids import is_fhir_id


class InvalidResource(ValueError):
    """A resource that can never be stored (no resourceType, bad id...): retrying will not help."""


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
    """One `code` search token: system None = any system, '' = no system; code None = any code."""

    system: str | None
    code: str | None


@runtime_checkable
class Store(Protocol):
    dialect: str

    def migrate(self) -> int:
        """Apply pending migrations; returns the schema version. Idempotent."""

    def upsert_many(self, resources: list[dict]) -> UpsertCounts:
        """Store every resource in one transaction, applying the versioning rules above."""

    def read(self, resource_type: str, resource_id: str) -> dict | None:
        """The current version, with meta.versionId/lastUpdated, or None."""

    def search(self, resource_type: str, subject: str | None = None, code: list[TokenFilter] | None = None,
               count: int = 50, offset: int = 0) -> tuple[int, list[dict]]:
        """(total matches, one page). `subject` is a normalised reference (Patient/x); `code` is
        OR-ed tokens; newest date first, then id."""

    def ping(self) -> bool:
        """True when the database answers."""

    def close(self) -> None: ...


# --- shared helpers used by both adapters ---------------------------------------------------------

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
    body = dict(resource)
    meta = body.get("meta")
    if isinstance(meta, dict):
        meta = {k: v for k, v in meta.items() if k not in ("versionId", "lastUpdated")}
        if meta:
            body["meta"] = meta
        else:
            body.pop("meta")
    try:
        canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    except TypeError as exc:
        raise InvalidResource(f"not JSON-serialisable: {exc}") from exc
    return hashlib.sha256(canonical).hexdigest()


def now_instant() -> str:
    return format_utc(dt.datetime.now(dt.UTC))


def format_utc(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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
    if t.tzinfo is None:  # FHIR requires a zone when time is given; treat a missing one as UTC
        t = t.replace(tzinfo=dt.UTC)
    return format_utc(t)


def normalise_reference(ref: str, default_type: str = "Patient") -> str:
    """'x' -> 'Patient/x'; 'Patient/x' stays; 'http://host/fhir/Patient/x' -> 'Patient/x'."""
    ref = ref.strip()
    parts = [p for p in ref.split("/") if p]
    if "_history" in parts:
        parts = parts[:parts.index("_history")]
    if len(parts) >= 2:
        return f"{parts[-2]}/{parts[-1]}"
    return f"{default_type}/{ref}"


def _subject_of(resource: dict) -> str | None:
    subj = resource.get("subject")
    if isinstance(subj, dict) and isinstance(subj.get("reference"), str) and subj["reference"]:
        return normalise_reference(subj["reference"])
    return None


def _date_of(resource: dict) -> str | None:
    for key in ("effectiveDateTime", "effectiveInstant", "occurrenceDateTime", "issued"):
        if key in resource:
            return normalise_date(resource[key])
    for key in ("effectivePeriod", "occurrencePeriod"):
        period = resource.get(key)
        if isinstance(period, dict):
            return normalise_date(period.get("start") or period.get("end"))
    return None


def _codes_of(resource: dict) -> list[tuple[str, str]]:
    code = resource.get("code")
    out: list[tuple[str, str]] = []
    if isinstance(code, dict):
        for coding in code.get("coding") or []:
            if isinstance(coding, dict) and isinstance(coding.get("code"), str):
                system = coding.get("system") if isinstance(coding.get("system"), str) else ""
                if (system, coding["code"]) not in out:
                    out.append((system, coding["code"]))
    return out


@dataclass(slots=True)
class PreparedRow:
    """One resource ready to write: index columns, tokens, and the body with store-owned meta."""

    resource_type: str
    id: str
    version_id: int
    last_updated: str
    subject: str | None
    date: str | None
    content_hash: str
    body: dict
    codes: list[tuple[str, str]]

    def body_json(self) -> str:
        return orjson.dumps(self.body).decode()


def plan_upsert(resources: list[dict], existing: dict[tuple[str, str], tuple[int, str]],
                last_updated: str) -> tuple[UpsertCounts, list[PreparedRow], set[tuple[str, str]]]:
    """Apply the versioning rules to a batch, in order.

    `existing` maps (type, id) -> (version, content hash) for the stored rows. Returns the counts,
    the rows to write (final state per key), and the keys that already existed (their tokens must be
    replaced). A resource repeated in the batch is applied in order, like separate deliveries.
    """
    new = updated = unchanged = 0
    state = dict(existing)
    rows: dict[tuple[str, str], PreparedRow] = {}
    for resource in resources:
        rtype, rid = check_resource(resource)
        key = (rtype, rid)
        digest = content_hash(resource)
        prior = state.get(key)
        if prior is not None and prior[1] == digest:
            unchanged += 1
            continue
        version = 1 if prior is None else prior[0] + 1
        if prior is None:
            new += 1
        else:
            updated += 1
        meta = dict(resource.get("meta") or {})
        meta["versionId"] = str(version)
        meta["lastUpdated"] = last_updated
        body = {"resourceType": rtype, "id": rid, "meta": meta}
        body.update((k, v) for k, v in resource.items() if k not in ("resourceType", "id", "meta"))
        rows[key] = PreparedRow(rtype, rid, version, last_updated, _subject_of(resource), _date_of(resource),
                                digest, body, _codes_of(resource))
        state[key] = (version, digest)
    return UpsertCounts(new, updated, unchanged), list(rows.values()), set(existing) & set(rows)


def token_where(resource_type: str, subject: str | None, code: list[TokenFilter], ph: str) -> tuple[str, list]:
    """WHERE clause on resource_tokens for a type, optional subject and OR-ed code tokens; `ph` is the
    driver's placeholder (? for sqlite3, %s for psycopg)."""
    where, params = [f"resource_type={ph}"], [resource_type]
    if subject is not None:
        where.append(f"subject={ph}")
        params.append(subject)
    ors = []
    for t in code:
        parts = []
        if t.code is not None:
            parts.append(f"code={ph}")
            params.append(t.code)
        if t.system is not None:
            parts.append(f"system={ph}")
            params.append(t.system)
        ors.append("(" + " AND ".join(parts or ["1=1"]) + ")")
    where.append("(" + " OR ".join(ors) + ")")
    return " AND ".join(where), params


def chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]
