"""Bulk loader for the FHIR-read bench (`vigil bench --long`): millions of Observations (and one
RiskAssessment per patient-hour) written straight into the gateway store's tables, row for row what
the gateway's own write path (`upsert_many`, as the bus consumer calls it) would have stored.

    python -m vigil_bench.bulk_load --url postgresql://... --n 10000000 --patients 5000
    python -m vigil_bench.bulk_load --url sqlite:////tmp/x/gateway.db --n 100000 --patients 500

How it stays faithful: *templates written by the store itself*. One Observation per code (built with
`vigil.observation.build_observation`) and one RiskAssessment per qualitative-risk band (built with
`vigil_inference.riskassessment.build_risk_assessment`) are made with marker values in place of the
patient id, device id, resource ids, times, values and basis references, and stored with the store's
own `upsert_many` into the target database. Every row that write made in every table (resources,
resource_history, idx_token, idx_reference, idx_date, idx_string, idx_quantity) is read back and deleted again; each
of its values becomes literal pieces with markers between them. The loader then produces rows by
putting the per-row values where the markers were: on PostgreSQL server-side (`INSERT ... SELECT`
over `generate_series`, one statement per template and table per chunk of hours, nothing goes
through Python), on SQLite in Python (`executemany` in one transaction per chunk). `content_hash` is
the sha256 of the store's canonical JSON (`store.canonical_json`) of the same template with the same
values, `created_seq` comes from the store's sequence. Indexes (primary keys included) are dropped
before loading into an empty store and created again afterwards from their own definitions, then the
tables are vacuumed and analysed (PostgreSQL, with autovacuum off on them meanwhile) or analysed
(SQLite). A load that fails half-way leaves the store without its indexes: throw it away.

The data (`Plan`): `patients` patients, each with one monitor, a stay of 0.25x to 1.75x the mean
length (n / codes / patients hours) at a random place in a window of `weeks` weeks that ends an hour
before the last full hour; one reading per code per hour of the stay
(effective time = the hour + a per-patient offset + the code's index in seconds; values inside the
middle of the catalogue's plausible range), rows stored in time order (an hour of every patient,
then the next hour), so a patient's rows are spread over the tables as they are when data arrives
live. Ids are UUID-shaped md5 digests of the pipeline's names (`obs/<device>/<sequence>`,
`ra/<patient>/<model>/<interval start>`), computed the same way in SQL and in Python.
`resources(plan)` yields the very same resources as dicts, for writing them the normal way
(tests/integration/test_gateway_bulk_load.py checks both give identical rows and search results).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import random
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator

DEFAULT_CODES = ("HR", "Temp", "SBP", "MAP", "DBP", "Resp", "EtCO2", "FiO2", "SaO2", "Lactate")
MODEL = "vigil-sepsis"
MODEL_VERSION = "bench"
TABLES = {"resources": "id", "resource_history": "id", "idx_token": "resource_id",
          "idx_reference": "resource_id", "idx_date": "resource_id", "idx_string": "resource_id",
          "idx_quantity": "resource_id"}

# Markers: valid where they stand (ids are FHIR ids, times are times, values are plausible numbers)
# and found nowhere else in a template.
M_PID, M_DEV, M_OID, M_RAID = "qqPIDqq", "qqDEVqq", "qqOIDqq", "qqRAIDqq"
M_SEQ = 987654321
M_EFF = 549864182  # 1987-06-05T04:03:02Z
M_START = 584168400  # 1988-07-06T05:00:00Z (RiskAssessment interval start; end = +1 h)
M_PROB = {"low": 0.123457, "high": 0.923457}


def _basis_marker(j: int) -> str:
    return f"qqBASIS{j:03d}qq"


def _fmt_s(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch))


def _fmt_us(epoch_us: int) -> str:
    s, us = divmod(epoch_us, 1_000_000)
    return f"{_fmt_s(s)}.{us:06d}Z"


def md5_uuid(name: str) -> str:
    """A UUID-shaped id from a name (PostgreSQL: md5(name)::uuid::text gives the same)."""
    return str(uuid.UUID(hashlib.md5(name.encode()).hexdigest()))


# --- the data set ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Plan:
    nonce: str
    codes: tuple[str, ...]       # catalogue measurement keys: one Observation per code per patient-hour
    t_start: int                 # epoch seconds of hour 0 of the window (whole hour)
    hours: int                   # window length in hours
    starts: tuple[int, ...]      # per patient: first hour with readings
    lengths: tuple[int, ...]     # per patient: hours with readings
    risk: bool = True            # one RiskAssessment per patient-hour
    threshold: float = 0.8       # the model's alert threshold (qualitativeRisk high at or above)
    make_args: dict = dataclasses.field(default_factory=dict, compare=False)  # make_plan(**make_args) rebuilds it

    @property
    def patients(self) -> int:
        return len(self.starts)

    @property
    def patient_hours(self) -> int:
        return sum(self.lengths)

    @property
    def observations(self) -> int:
        return self.patient_hours * len(self.codes)

    @property
    def risk_assessments(self) -> int:
        return self.patient_hours if self.risk else 0

    @property
    def t_end(self) -> int:
        return self.t_start + 3600 * self.hours

    def patient_id(self, p: int) -> str:
        return f"{self.nonce}-p{p}"

    def device_id(self, p: int) -> str:
        return f"{self.nonce}-mon{p}"

    def patient_hours_at(self, h: int) -> list[int]:
        return [p for p in range(self.patients) if self.starts[p] <= h < self.starts[p] + self.lengths[p]]

    def obs_id(self, p: int, h: int, c: int) -> str:
        return md5_uuid(f"obs/{self.device_id(p)}/{(h - self.starts[p]) * len(self.codes) + c}")

    def to_json(self) -> dict:
        return {"nonce": self.nonce, "codes": list(self.codes), "t_start": self.t_start, "hours": self.hours,
                "patients": self.patients, "observations": self.observations,
                "risk_assessments": self.risk_assessments, "threshold": self.threshold,
                "make_args": self.make_args}

    @classmethod
    def from_json(cls, doc: dict) -> Plan:
        """The plan of a to_json() document (or of bulk_load's output, which holds it under "plan")."""
        args = dict((doc.get("plan") or doc)["make_args"])
        args["codes"] = tuple(args["codes"])
        return make_plan(**args)

    def window_start_iso(self) -> str:
        return _fmt_s(self.t_start) + "Z"


def make_plan(n_obs: int, n_patients: int, *, weeks: float = 4, end: int | None = None, nonce: str = "bulk",
              codes: tuple[str, ...] = DEFAULT_CODES, risk: bool = True, seed: int = 7) -> Plan:
    """`n_obs` // len(codes) patient-hours over `n_patients` patients (stays of 0.25x..1.75x the mean,
    random starts) in a window of `weeks` weeks ending at `end` (default: the last whole hour, minus one)."""
    if end is None:
        end = (int(time.time()) // 3600 - 1) * 3600
    end -= end % 3600
    args = {"n_obs": n_obs, "n_patients": n_patients, "weeks": weeks, "end": end, "nonce": nonce,
            "codes": list(codes), "risk": risk, "seed": seed}
    ph = n_obs // len(codes)
    if ph < n_patients:
        raise ValueError(f"{n_obs} Observations of {len(codes)} codes do not give every one of {n_patients} "
                         "patients an hour")
    mean = ph / n_patients
    window = max(round(weeks * 168), math.ceil(mean * 1.75) + 1)
    rng = random.Random(seed)
    raw = [rng.uniform(0.25, 1.75) for _ in range(n_patients)]
    scale = ph / sum(raw)
    lengths = [max(1, min(window, round(r * scale))) for r in raw]
    diff, p = ph - sum(lengths), 0
    while diff:
        step = 1 if diff > 0 else -1
        if 1 <= lengths[p] + step <= window:
            lengths[p] += step
            diff -= step
        p = (p + 1) % n_patients
    starts = [rng.randint(0, window - n) for n in lengths]
    return Plan(nonce, tuple(codes), end - window * 3600, window, tuple(starts), tuple(lengths), risk,
                make_args=args)


def _measurements(codes: tuple[str, ...]) -> list:
    from vigil.catalogue import load_catalogue

    cat = load_catalogue()
    by_key = {m.key: m for m in cat.measurements}
    out = []
    for k in codes:
        m = by_key.get(k)
        if m is None or getattr(m, "components", ()):
            raise ValueError(f"{k!r} is not a single-value catalogue measurement")
        out.append(m)
    return out


def _value_params(m) -> tuple[int, int]:
    """(low, span) in tenths: values lo10 + k % span, inside the middle 40% of the plausible range."""
    lo, hi = m.plausible
    return round(10 * (lo + 0.3 * (hi - lo))), max(1, round(4 * (hi - lo)))


# Per-row values. Each is written twice, in Python (SQLite, `resources`) and in SQL (PostgreSQL); the
# test compares the two paths row by row.

def _offset(p: int) -> int:
    return (p * 97) % 3000


def _v10(p: int, h: int, c: int, lo10: int, span: int) -> int:
    return lo10 + (p * 7919 + h * 104729 + c * 31337) % span


def _value_text(v10: int) -> str:
    return f"{'-' if v10 < 0 else ''}{abs(v10) // 10}.{abs(v10) % 10}"


def _q(p: int, h: int) -> int:  # probability = (2q + 1) / 2000, q in 1..999: "0.0015" .. "0.9995"
    return 1 + (p * 7919 + h * 104729) % 999


def _obs_lu_us(p: int, h: int, c: int, eff: int) -> int:
    return (eff + 2) * 1_000_000 + (p * 7919 + h * 31 + c * 7) % 1_000_000


def _ra_lu_us(p: int, h: int, end: int) -> int:
    return (end + 5) * 1_000_000 + (p * 7919 + h * 31) % 1_000_000


def _obs_ctx(plan: Plan, p: int, h: int, c: int, vp: tuple[int, int]) -> dict:
    eff = plan.t_start + h * 3600 + _offset(p) + c
    seq = (h - plan.starts[p]) * len(plan.codes) + c
    dev = plan.device_id(p)
    return {"pid": plan.patient_id(p), "dev": dev, "seq": str(seq), "oid": md5_uuid(f"obs/{dev}/{seq}"),
            "eff": _fmt_s(eff), "val": _value_text(_v10(p, h, c, *vp)), "lu": _fmt_us(_obs_lu_us(p, h, c, eff))}


def _ra_ctx(plan: Plan, p: int, h: int) -> dict:
    start = plan.t_start + h * 3600
    pid, dev, n = plan.patient_id(p), plan.device_id(p), len(plan.codes)
    ctx = {"pid": pid, "raid": md5_uuid(f"ra/{pid}/{MODEL}/{start}"), "ps": _fmt_s(start),
           "pe": _fmt_s(start + 3600), "prob": f"0.{(2 * _q(p, h) + 1) * 5:04d}",
           "lu": _fmt_us(_ra_lu_us(p, h, start + 3600))}
    base = (h - plan.starts[p]) * n
    for j in range(n):
        ctx[f"b{j}"] = md5_uuid(f"obs/{dev}/{base + j}")
    return ctx


def _band(plan: Plan, p: int, h: int) -> str:
    return "high" if (2 * _q(p, h) + 1) / 2000 >= plan.threshold else "low"


def _obs_resource(plan: Plan, m, vp: tuple[int, int], p: int, h: int, c: int) -> dict:
    from vigil.observation import build_observation

    seq = (h - plan.starts[p]) * len(plan.codes) + c
    return build_observation(m, device_id=plan.device_id(p), patient_id=plan.patient_id(p), sequence=seq,
                             value=_v10(p, h, c, *vp) / 10, effective=plan.t_start + h * 3600 + _offset(p) + c,
                             obs_id=md5_uuid(f"obs/{plan.device_id(p)}/{seq}"))


def _ra_resource(plan: Plan, p: int, h: int) -> dict:
    from vigil_inference.riskassessment import build_risk_assessment

    start = plan.t_start + h * 3600
    ra = build_risk_assessment(
        patient_id=plan.patient_id(p), model_name=MODEL, model_version=MODEL_VERSION, interval_start=start,
        interval_end=start + 3600, probability=(2 * _q(p, h) + 1) / 2000, threshold=plan.threshold,
        basis=[plan.obs_id(p, h, c) for c in range(len(plan.codes))])
    ra["id"] = md5_uuid(f"ra/{plan.patient_id(p)}/{MODEL}/{start}")
    return ra


def patient_hour_resources(plan: Plan, p: int, h: int) -> list[dict]:
    """The resources of patient `p` for hour `h` of the window (none outside the stay)."""
    if not plan.starts[p] <= h < plan.starts[p] + plan.lengths[p]:
        return []
    ms = _measurements(plan.codes)
    out = [_obs_resource(plan, m, _value_params(m), p, h, c) for c, m in enumerate(ms)]
    if plan.risk:
        out.append(_ra_resource(plan, p, h))
    return out


def resources(plan: Plan, hours: range | None = None) -> Iterator[dict]:
    """The plan's resources as the pipeline would publish them, in load order (hour by hour)."""
    ms = _measurements(plan.codes)
    vps = [_value_params(m) for m in ms]
    for h in hours if hours is not None else range(plan.hours):
        active = plan.patient_hours_at(h)
        for c, m in enumerate(ms):
            for p in active:
                yield _obs_resource(plan, m, vps[c], p, h, c)
        if plan.risk:
            for p in active:
                yield _ra_resource(plan, p, h)


# --- templates ------------------------------------------------------------------------------------

Part = str | tuple[str]  # a literal piece, or (marker name,)


@dataclasses.dataclass
class Column:
    name: str
    kind: str           # lit | text | json | jsonb | seq | hash | num (json/jsonb: PostgreSQL's column type)
    value: object = None  # lit: the value; text/json/jsonb/hash: list[Part]; num: [(marker name,)]


@dataclasses.dataclass
class Template:
    kind: str          # observation | risk
    key: object        # code index (observation) or band (risk)
    rows: dict[str, list[list[Column]]]  # table -> rows -> columns


def _split(text: str, markers: dict[str, str]) -> list[Part]:
    """text -> literal pieces and (name,) where a marker stood."""
    by_text = {v: k for k, v in markers.items()}
    pattern = re.compile("|".join(re.escape(v) for v in sorted(by_text, key=len, reverse=True)))
    out: list[Part] = []
    pos = 0
    for mt in pattern.finditer(text):
        if mt.start() > pos:
            out.append(text[pos:mt.start()])
        out.append((by_text[mt.group(0)],))
        pos = mt.end()
    if pos < len(text):
        out.append(text[pos:])
    return out


def _template_resources(plan: Plan) -> list[tuple[str, object, dict, dict[str, str]]]:
    """(kind, key, resource with markers, {marker name: marker text})"""
    from vigil_inference.riskassessment import build_risk_assessment

    from vigil.observation import build_observation, format_instant

    out = []
    for c, m in enumerate(_measurements(plan.codes)):
        lo, hi = m.plausible
        val = float(f"{int((lo + hi) / 2)}.777777")
        if not m.is_plausible(val):
            raise AssertionError(f"marker value {val} not plausible for {m.key}")
        o = build_observation(m, device_id=M_DEV, patient_id=M_PID, sequence=M_SEQ, value=val,
                              effective=M_EFF, obs_id=f"{M_OID}{c}")
        marks = {"pid": M_PID, "dev": M_DEV, "oid": f"{M_OID}{c}", "seq": str(M_SEQ),
                 "eff": format_instant(M_EFF)[:-1], "val": repr(val)}
        out.append(("observation", c, o, marks))
    if plan.risk:
        basis = [_basis_marker(j) for j in range(len(plan.codes))]
        for band, prob in M_PROB.items():
            ra = build_risk_assessment(patient_id=M_PID, model_name=MODEL, model_version=MODEL_VERSION,
                                       interval_start=M_START, interval_end=M_START + 3600, probability=prob,
                                       threshold=plan.threshold, basis=basis)
            if (prob >= plan.threshold) != (band == "high"):
                raise AssertionError(f"marker probability {prob} is not {band} at threshold {plan.threshold}")
            ra["id"] = f"{M_RAID}{band}"
            marks = {"pid": M_PID, "raid": ra["id"], "ps": _fmt_s(M_START), "pe": _fmt_s(M_START + 3600),
                     "prob": repr(prob), **{f"b{j}": b for j, b in enumerate(basis)}}
            out.append(("risk", band, ra, marks))
    return out


def _number_marker(v: float, marks: dict[str, str]) -> str | None:
    """The marker (val: an Observation's value, prob: a RiskAssessment's probability) a stored number is."""
    return next((k for k in ("val", "prob") if k in marks and v == float(marks[k])), None)


class _Db:
    """The two dialects' connection details the loader needs."""

    def __init__(self, url: str):
        self.url = url
        self.pg = url.startswith(("postgresql://", "postgres://"))
        if self.pg:
            import psycopg
            self.conn = psycopg.connect(url, autocommit=True)
        else:
            import sqlite3

            from vigil_gateway.sqlite_store import sqlite_path
            self.conn = sqlite3.connect(sqlite_path(url), isolation_level=None)

    def q(self, sql: str, args=None) -> list:
        if not self.pg:
            return self.conn.execute(sql, args or ()).fetchall()
        cur = self.conn.execute(sql.replace("?", "%s") if args else sql, args)
        return cur.fetchall() if cur.description else []

    def columns(self, table: str) -> list[tuple[str, str]]:
        if self.pg:
            return self.q("SELECT column_name, data_type FROM information_schema.columns WHERE table_name=? "
                          "AND table_schema=current_schema() ORDER BY ordinal_position", [table])
        return [(r[1], (r[2] or "").lower()) for r in self.q(f"PRAGMA table_info({table})")]

    def close(self) -> None:
        self.conn.close()


def learn_templates(db: _Db, store, plan: Plan) -> list[Template]:
    """Store the template resources with the store's own write path, read back every row they made,
    delete them, and turn the rows into templates."""
    from vigil_gateway.store import canonical_json, content_hash

    made = _template_resources(plan)
    store.upsert_many([r for _, _, r, _ in made])
    templates = []
    for kind, key, resource, marks in made:
        rid = resource["id"]
        rows: dict[str, list[list[Column]]] = {}
        lu = None
        canonical = canonical_json(resource).decode()
        for table, id_col in TABLES.items():
            cols = db.columns(table)
            select = ", ".join(f"{n}::text" if t in ("json", "jsonb") else n for n, t in cols)
            got = db.q(f"SELECT {select} FROM {table} WHERE resource_type=? AND {id_col}=?",
                       [resource["resourceType"], rid])
            if table == "resources":
                if len(got) != 1:
                    raise AssertionError(f"template {rid}: {len(got)} resources rows")
                row = dict(zip([n for n, _ in cols], got[0], strict=True))
                lu = row["last_updated"]
                if row["content_hash"] != content_hash(resource):
                    raise AssertionError("the store's content_hash is not sha256(canonical_json)")
            all_marks = {**marks, "lu": lu}
            out_rows = []
            for values in got:
                out = []
                for (name, typ), v in zip(cols, values, strict=True):
                    if name == "created_seq":
                        out.append(Column(name, "seq"))
                    elif name == "content_hash":
                        out.append(Column(name, "hash", _split(canonical, marks)))
                    elif isinstance(v, float) and (num := _number_marker(v, marks)) is not None:
                        out.append(Column(name, "num", [(num,)]))  # resources.value_num, idx_quantity.value
                    elif isinstance(v, str):
                        parts = _split(v, all_marks)
                        out.append(Column(name, typ if typ in ("json", "jsonb") else "text", parts)
                                   if any(isinstance(x, tuple) for x in parts) else Column(name, "lit", v))
                    else:
                        out.append(Column(name, "lit", v))
                out_rows.append(out)
            rows[table] = out_rows
        templates.append(Template(kind, key, rows))
    # gone again: the loaded data starts from an empty store
    for table, id_col in TABLES.items():
        for _kind, _key, resource, _ in made:
            db.q(f"DELETE FROM {table} WHERE resource_type=? AND {id_col}=?", [resource["resourceType"], resource["id"]])
    return templates


# --- PostgreSQL: server-side generation -----------------------------------------------------------

def _lit(v: object) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, bool):
        return "TRUE" if v else "FALSE"
    if isinstance(v, int):
        return str(v)
    return "'" + str(v).replace("'", "''") + "'"


def _sql_parts(parts: list[Part]) -> str:
    return "(" + " || ".join(f"x.{p[0]}" if isinstance(p, tuple) else _lit(p) for p in parts) + ")"


def _sql_col(col: Column) -> str:
    if col.kind == "lit":
        return _lit(col.value)
    if col.kind == "seq":
        return "nextval('resource_seq')"
    if col.kind == "hash":
        return f"encode(sha256(convert_to({_sql_parts(col.value)}, 'UTF8')), 'hex')"
    if col.kind in ("json", "jsonb"):
        return f"{_sql_parts(col.value)}::{col.kind}"
    if col.kind == "num":
        return f"({_sql_parts(col.value)})::double precision"
    return _sql_parts(col.value)


_TS = "'YYYY-MM-DD\"T\"HH24:MI:SS'"
_TS_US = "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'"


def _pg_obs_source(plan: Plan, c: int, vp: tuple[int, int], h0: int, h1: int) -> str:
    n = len(plan.codes)
    lo10, span = vp
    return f"""(SELECT y.*,
        md5('obs/' || y.dev || '/' || y.seq)::uuid::text AS oid,
        to_char(to_timestamp(y.e) AT TIME ZONE 'UTC', {_TS}) AS eff,
        CASE WHEN y.v < 0 THEN '-' ELSE '' END || (abs(y.v) / 10)::text || '.' || (abs(y.v) % 10)::text AS val,
        to_char(to_timestamp(y.e + 2) AT TIME ZONE 'UTC'
                + ((y.p::bigint * 7919 + y.h * 31 + {c * 7}) % 1000000) * interval '1 microsecond', {_TS_US}) AS lu
    FROM (SELECT b.p, b.pid, b.dev, g.h, ((g.h - b.start_h) * {n} + {c})::text AS seq,
                 {plan.t_start} + g.h::bigint * 3600 + b.off + {c} AS e,
                 {lo10} + (b.p::bigint * 7919 + g.h::bigint * 104729 + {c * 31337}) % {span} AS v
          FROM generate_series({h0}, {h1 - 1}) g(h)
          JOIN bulk_patients b ON g.h >= b.start_h AND g.h < b.start_h + b.len
          ORDER BY g.h, b.p) y) x"""


def _pg_ra_source(plan: Plan, band: str, h0: int, h1: int) -> str:
    n = len(plan.codes)
    thr = round(plan.threshold * 2000)
    cond = f">= {thr}" if band == "high" else f"< {thr}"
    basis = ", ".join(f"md5('obs/' || y.dev || '/' || ((y.h - y.start_h) * {n} + {j}))::uuid::text AS b{j}"
                      for j in range(n))
    return f"""(SELECT y.pid,
        md5('ra/' || y.pid || '/{MODEL}/' || y.s)::uuid::text AS raid,
        to_char(to_timestamp(y.s) AT TIME ZONE 'UTC', {_TS}) AS ps,
        to_char(to_timestamp(y.s + 3600) AT TIME ZONE 'UTC', {_TS}) AS pe,
        '0.' || lpad(((2 * y.q + 1) * 5)::text, 4, '0') AS prob,
        to_char(to_timestamp(y.s + 3605) AT TIME ZONE 'UTC'
                + ((y.p::bigint * 7919 + y.h * 31) % 1000000) * interval '1 microsecond', {_TS_US}) AS lu,
        {basis}
    FROM (SELECT b.p, b.pid, b.dev, b.start_h, g.h, {plan.t_start} + g.h::bigint * 3600 AS s,
                 1 + (b.p::bigint * 7919 + g.h::bigint * 104729) % 999 AS q
          FROM generate_series({h0}, {h1 - 1}) g(h)
          JOIN bulk_patients b ON g.h >= b.start_h AND g.h < b.start_h + b.len
          ORDER BY g.h, b.p) y
    WHERE 2 * y.q + 1 {cond}) x"""


def _pg_inserts(t: Template, source: str) -> list[str]:
    out = []
    for table, rows in t.rows.items():
        if not rows:
            continue
        names = ", ".join(f'"{c.name}"' for c in rows[0])
        if len(rows) == 1:
            out.append(f"INSERT INTO {table} ({names}) SELECT {', '.join(_sql_col(c) for c in rows[0])} "
                       f"FROM {source}")
        else:
            values = ", ".join("(" + ", ".join(_sql_col(c) for c in r) + ")" for r in rows)
            out.append(f"INSERT INTO {table} ({names}) SELECT v.* FROM {source} "
                       f"CROSS JOIN LATERAL (VALUES {values}) AS v({names})")
    return out


# --- indexes --------------------------------------------------------------------------------------

def _drop_indexes(db: _Db) -> list[str]:
    """Drop every index (and primary key) of the loaded tables; returns the statements recreating them."""
    tables = list(TABLES)
    recreate: list[str] = []
    if db.pg:
        cons = db.q("SELECT c.conname, c.conrelid::regclass::text, pg_get_constraintdef(c.oid) FROM pg_constraint c "
                    "WHERE c.conrelid::regclass::text = ANY(?) AND c.contype IN ('p', 'u')", [tables])
        con_names = {n for n, _, _ in cons}
        idx = db.q("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname=current_schema() "
                   "AND tablename = ANY(?)", [tables])
        for name, table, definition in cons:
            db.q(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
            recreate.append(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}')
        for name, definition in idx:
            if name in con_names:
                continue
            db.q(f'DROP INDEX "{name}"')
            recreate.append(definition)
    else:
        idx = db.q("SELECT name, sql FROM sqlite_master WHERE type='index' AND sql IS NOT NULL AND tbl_name IN ("
                   + ",".join("?" * len(tables)) + ")", tables)
        for name, definition in idx:
            db.q(f'DROP INDEX "{name}"')
            recreate.append(definition)
    return recreate


# --- loading --------------------------------------------------------------------------------------

@dataclasses.dataclass
class LoadResult:
    plan: Plan
    observations: int
    risk_assessments: int
    seconds_load: float
    seconds_index: float
    seconds_analyze: float
    rows: dict[str, int]
    bytes_on_disk: int | None
    history: bool = True

    @property
    def resources(self) -> int:
        return self.observations + self.risk_assessments

    @property
    def seconds(self) -> float:
        return self.seconds_load + self.seconds_index + self.seconds_analyze

    def to_json(self) -> dict:
        return {"plan": self.plan.to_json(), "observations": self.observations,
                "risk_assessments": self.risk_assessments, "resources": self.resources,
                "seconds_total": round(self.seconds, 1), "seconds_load": round(self.seconds_load, 1),
                "seconds_index": round(self.seconds_index, 1), "seconds_analyze": round(self.seconds_analyze, 1),
                "resources_per_s": round(self.resources / self.seconds, 1) if self.seconds else None,
                "rows": self.rows, "bytes_on_disk": self.bytes_on_disk, "history": self.history}


def bulk_load(url: str, plan: Plan, *, chunk_hours: int = 6, drop_indexes: bool = True, history: bool = True,
              progress: Callable[[str], None] | None = None) -> LoadResult:
    """Fill the (migrated or not) store at `url` with `plan`'s resources. The store must hold no resources.

    history=False leaves resource_history empty (the gateway would hold each body there too, as
    version 1): only to fit a big load on a small disk, since no search reads that table."""
    from vigil_gateway.bootstrap import build_store

    say = progress or (lambda _msg: None)
    store = build_store(url)
    db = None
    try:
        store.migrate()
        db = _Db(url)
        templates = learn_templates(db, store, plan)
        if not history:
            for t in templates:
                t.rows.pop("resource_history", None)
        store.close()
        store = None
        if db.q("SELECT COUNT(*) FROM resources")[0][0]:
            raise RuntimeError("bulk_load needs an empty store (no resources)")
        recreate = _drop_indexes(db) if drop_indexes else []
        if db.pg:  # no autovacuum racing the load and the index builds: one VACUUM (ANALYZE) at the end
            for table in TABLES:
                db.q(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
        try:
            t0 = time.perf_counter()
            if db.pg:
                _load_pg(db, plan, templates, chunk_hours, say)
            else:
                _load_sqlite(db, plan, templates, chunk_hours, say)
            t_load = time.perf_counter() - t0
            t1 = time.perf_counter()
            if db.pg:
                db.q("SET maintenance_work_mem = '1GB'")
            else:  # the sorter works in the page cache: 2 GB and a helper thread make 40M-row indexes
                db.q("PRAGMA cache_size=-2097152")  # minutes instead of tens of minutes
                db.q("PRAGMA threads=2")
            for i, statement in enumerate(recreate):
                say(f"index {i + 1}/{len(recreate)}: {statement[:100]}")
                db.q(statement)
            t_index = time.perf_counter() - t1
            t2 = time.perf_counter()
            say("vacuum/analyze")
            if db.pg:
                for table in TABLES:
                    db.q(f"VACUUM (ANALYZE) {table}")
            else:
                db.q("PRAGMA analysis_limit=10000")  # sampled statistics: a full ANALYZE reads every index
                db.q("ANALYZE")
            t_analyze = time.perf_counter() - t2
        finally:
            if db.pg:
                for table in TABLES:
                    db.q(f"ALTER TABLE {table} RESET (autovacuum_enabled)")
        rows = {t: db.q(f"SELECT COUNT(*) FROM {t}")[0][0] for t in TABLES}
        n_obs = db.q("SELECT COUNT(*) FROM resources WHERE resource_type='Observation'")[0][0]
        n_ra = db.q("SELECT COUNT(*) FROM resources WHERE resource_type='RiskAssessment'")[0][0]
        size = None
        if db.pg:
            size = db.q("SELECT pg_database_size(current_database())")[0][0]
        else:
            from vigil_gateway.sqlite_store import sqlite_path
            with contextlib.suppress(OSError):
                import pathlib
                size = sum(f.stat().st_size for f in pathlib.Path(sqlite_path(url)).parent.glob(
                    pathlib.Path(sqlite_path(url)).name + "*"))
        return LoadResult(plan, n_obs, n_ra, t_load, t_index, t_analyze, rows, size, history)
    finally:
        if store is not None:
            store.close()
        if db is not None:
            db.close()


def _chunks(plan: Plan, chunk_hours: int) -> Iterator[tuple[int, int]]:
    for h0 in range(0, plan.hours, chunk_hours):
        yield h0, min(plan.hours, h0 + chunk_hours)


def _load_pg(db: _Db, plan: Plan, templates: list[Template], chunk_hours: int, say) -> None:
    if db.q("SHOW standard_conforming_strings")[0][0] != "on":
        raise RuntimeError("bulk_load needs standard_conforming_strings=on")
    db.q("SET synchronous_commit = off")
    db.q("CREATE TEMP TABLE bulk_patients (p int, pid text, dev text, start_h int, len int, off int)")
    with db.conn.cursor() as cur:
        cur.execute("INSERT INTO bulk_patients SELECT * FROM unnest(%s::int[], %s::text[], %s::text[], %s::int[], "
                    "%s::int[], %s::int[])",
                    [list(range(plan.patients)), [plan.patient_id(p) for p in range(plan.patients)],
                     [plan.device_id(p) for p in range(plan.patients)], list(plan.starts), list(plan.lengths),
                     [_offset(p) for p in range(plan.patients)]])
    db.q("ANALYZE bulk_patients")
    vps = [_value_params(m) for m in _measurements(plan.codes)]
    t0 = time.perf_counter()
    for h0, h1 in _chunks(plan, chunk_hours):
        with db.conn.transaction():
            for t in templates:
                src = (_pg_obs_source(plan, t.key, vps[t.key], h0, h1) if t.kind == "observation"
                       else _pg_ra_source(plan, t.key, h0, h1))
                for statement in _pg_inserts(t, src):
                    db.conn.execute(statement)
        if h1 == plan.hours or h0 // chunk_hours % 10 == 0:
            say(f"hours {h1}/{plan.hours} ({time.perf_counter() - t0:.0f} s)")


def _py_fill(parts: list[Part]) -> Callable[[dict], str]:
    fmt = "".join("{" + p[0] + "}" if isinstance(p, tuple) else p.replace("{", "{{").replace("}", "}}")
                  for p in parts)
    return fmt.format_map


def _load_sqlite(db: _Db, plan: Plan, templates: list[Template], chunk_hours: int, say) -> None:
    conn = db.conn
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-262144")
    seq = conn.execute("SELECT value FROM resource_seq WHERE id=1").fetchone()[0]
    vps = [_value_params(m) for m in _measurements(plan.codes)]
    # per template and table: (INSERT statement, [per column: callable(ctx, seq) -> value])
    compiled: list[tuple[Template, list[tuple[str, list[list[Callable]]]]]] = []
    for t in templates:
        per_table = []
        for table, rows in t.rows.items():
            if not rows:
                continue
            names = [c.name for c in rows[0]]
            sql = f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
            fns = []
            for r in rows:
                row_fns = []
                for c in r:
                    if c.kind == "lit":
                        row_fns.append(lambda ctx, s, v=c.value: v)
                    elif c.kind == "seq":
                        row_fns.append(lambda ctx, s: s)
                    elif c.kind == "hash":
                        f = _py_fill(c.value)
                        row_fns.append(lambda ctx, s, f=f: hashlib.sha256(f(ctx).encode()).hexdigest())
                    elif c.kind == "num":
                        f = _py_fill(c.value)
                        row_fns.append(lambda ctx, s, f=f: float(f(ctx)))
                    else:
                        f = _py_fill(c.value)
                        row_fns.append(lambda ctx, s, f=f: f(ctx))
                fns.append(row_fns)
            per_table.append((sql, fns))
        compiled.append((t, per_table))
    t0 = time.perf_counter()
    for h0, h1 in _chunks(plan, chunk_hours):
        conn.execute("BEGIN")
        try:
            for t, per_table in compiled:
                batches: dict[str, list] = {sql: [] for sql, _ in per_table}
                for h in range(h0, h1):
                    for p in plan.patient_hours_at(h):
                        if t.kind == "observation":
                            ctx = _obs_ctx(plan, p, h, t.key, vps[t.key])
                        elif _band(plan, p, h) == t.key:
                            ctx = _ra_ctx(plan, p, h)
                        else:
                            continue
                        seq += 1
                        for sql, fns in per_table:
                            out = batches[sql]
                            for row_fns in fns:
                                out.append(tuple(f(ctx, seq) for f in row_fns))
                for sql, rows in batches.items():
                    conn.executemany(sql, rows)
            conn.execute("UPDATE resource_seq SET value=? WHERE id=1", (seq,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if h1 == plan.hours or h0 // chunk_hours % 10 == 0:
            say(f"hours {h1}/{plan.hours} ({time.perf_counter() - t0:.0f} s)")


# --- checks ---------------------------------------------------------------------------------------

def verify_sample(url: str, plan: Plan, n: int = 20, seed: int = 3) -> int:
    """Read `n` random loaded resources and check them against the normal write path's rules: the
    body equals the resource the pipeline would have published (`resources`), content_hash is the
    store's hash of it, and the index rows are exactly `fhirindex.index_rows` of it. Returns n checked."""
    from vigil_gateway.fhirindex import index_rows, quantity_rows
    from vigil_gateway.store import content_hash

    rng = random.Random(seed)
    db = _Db(url)
    try:
        checked = 0
        for _ in range(n):
            p = rng.randrange(plan.patients)
            h = plan.starts[p] + rng.randrange(plan.lengths[p])
            for want in patient_hour_resources(plan, p, h):
                body_col = "body::text" if db.pg else "body"
                got = db.q(f"SELECT {body_col}, content_hash, subject, date, date_high, value_num, value_system, "
                           "value_code, value_unit FROM resources WHERE resource_type=? AND id=?",
                           [want["resourceType"], want["id"]])
                if not got:
                    raise AssertionError(f"{want['resourceType']}/{want['id']} not loaded")
                body = json.loads(got[0][0])
                meta = body.get("meta") or {}
                if meta.get("versionId") != "1" or not str(meta.get("lastUpdated", "")).endswith("Z"):
                    raise AssertionError(f"bad meta {meta}")
                if content_hash(body) != got[0][1] or content_hash(want) != got[0][1]:
                    raise AssertionError(f"{want['id']}: content differs from the pipeline's resource")
                ix = index_rows(body)
                if (got[0][2], (got[0][3], got[0][4])) != (ix.subject, ix.date):
                    raise AssertionError(f"{want['id']}: subject/date columns differ")
                if tuple(got[0][5:9]) != (ix.value or (None,) * 4):
                    raise AssertionError(f"{want['id']}: value columns differ")
                toks = db.q("SELECT param, system, value, subject, date_low, date_high FROM idx_token "
                            "WHERE resource_type=? AND resource_id=?", [want["resourceType"], want["id"]])
                lo, hi = ix.date or (None, None)
                if sorted(toks) != sorted((pp, s, v, ix.subject, lo, hi) for pp, s, v in ix.tokens):
                    raise AssertionError(f"{want['id']}: idx_token rows differ")
                refs = db.q("SELECT param, target FROM idx_reference WHERE resource_type=? AND resource_id=?",
                            [want["resourceType"], want["id"]])
                if sorted(refs) != sorted(ix.refs):
                    raise AssertionError(f"{want['id']}: idx_reference rows differ")
                qtys = db.q("SELECT param, value, system, code, unit FROM idx_quantity WHERE resource_type=? "
                            "AND resource_id=?", [want["resourceType"], want["id"]])
                if sorted(qtys) != sorted(quantity_rows(want["resourceType"], ix)):
                    raise AssertionError(f"{want['id']}: idx_quantity rows differ")
                checked += 1
        return checked
    finally:
        db.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="sqlite:///path or postgresql://... (an empty store)")
    ap.add_argument("--n", type=int, default=100_000, help="Observations (default 100000)")
    ap.add_argument("--patients", type=int, default=500)
    ap.add_argument("--weeks", type=float, default=4)
    ap.add_argument("--chunk-hours", type=int, default=6)
    ap.add_argument("--no-risk", action="store_true", help="no RiskAssessments")
    ap.add_argument("--no-history", action="store_true",
                    help="leave resource_history empty (saves ~1/4 of the disk; searches never read it)")
    args = ap.parse_args(argv)
    plan = make_plan(args.n, args.patients, weeks=args.weeks, risk=not args.no_risk)
    res = bulk_load(args.url, plan, chunk_hours=args.chunk_hours, history=not args.no_history,
                    progress=lambda m: print(f"bulk_load: {m}", file=sys.stderr, flush=True))
    out = res.to_json()
    out["verified"] = verify_sample(args.url, plan)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
