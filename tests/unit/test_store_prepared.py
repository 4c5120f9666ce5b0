"""The bus consumer prepares a batch (key, content hash, index rows) in its decode thread, before the
write transaction (store.prepare_resources). The store must then write exactly what it writes without
that: the same rows, versions and index rows, for every kind of resource the pipeline and the EHR send.
It holds because index rows read no store-owned `meta`; a search parameter over meta (_lastUpdated,
_tag...) would break it, and this test with it."""
from __future__ import annotations

import copy
import json
import pathlib

import pytest
from vigil_gateway.store import InvalidResource, content_hash, plan_upsert, prepare_resources

GOLDEN = pathlib.Path(__file__).parent.parent / "golden"


def _batch() -> list[dict]:
    golden = [json.loads(p.read_text()) for p in sorted(GOLDEN.glob("*.json"))]
    patient = {"resourceType": "Patient", "id": "p000001", "meta": {"versionId": "3", "lastUpdated":
               "2026-01-01T00:00:00Z", "tag": [{"system": "urn:x", "code": "y"}]},
               "identifier": [{"system": "https://physionet.org/content/challenge-2019/", "value": "p000001"}],
               "name": [{"family": "Doe", "given": ["Ann"]}], "gender": "female", "birthDate": "1960-05-01"}
    encounter = {"resourceType": "Encounter", "id": "e1", "status": "in-progress", "class": {"code": "IMP"},
                 "subject": {"reference": "Patient/p000001"},
                 "period": {"start": "2026-01-01T00:00:00Z"}, "meta": {"lastUpdated": "2025-01-01T00:00:00Z"}}
    changed = copy.deepcopy(golden[0])
    changed["status"] = "amended"
    return [*golden, patient, encounter, golden[0], changed, copy.deepcopy(golden[4])]


def test_prepared_batch_plans_exactly_as_the_unprepared_one():
    batch = _batch()
    keys = [(r["resourceType"], r["id"]) for r in batch]
    # stored already: one with the same content (unchanged), one with other content (updated)
    existing = {keys[2]: (4, content_hash(batch[2])), keys[3]: (2, "0" * 64)}
    now = "2026-12-03T10:00:00.000Z"
    plain = plan_upsert(copy.deepcopy(batch), existing, now)
    prepared = plan_upsert(copy.deepcopy(batch), existing, now, prepared=prepare_resources(batch))
    assert prepared == plain
    counts, rows, _ = plain
    assert counts.unchanged >= 2 and counts.updated >= 2 and counts.new >= 5  # every branch was taken
    assert any(r.index.tokens for r in rows) and any(r.index.refs for r in rows)
    assert any(r.index.strings for r in rows) and any(r.index.dates for r in rows)


def test_prepare_refuses_what_the_store_refuses():
    with pytest.raises(InvalidResource):
        prepare_resources([{"resourceType": "Observation", "id": "bad id"}])
    with pytest.raises(ValueError, match="one entry per resource"):
        plan_upsert(_batch(), {}, "2026-12-03T10:00:00.000Z", prepared=[])
