"""The bus consumer on a real NATS JetStream server, storing into SQLite."""
from __future__ import annotations

import asyncio
import uuid

import nats
import pytest
from vigil_gateway.bootstrap import build_store
from vigil_gateway.consumer import BusConsumer

from vigil import bus

pytestmark = pytest.mark.integration


def observation(oid, patient, value=80.0):
    return {"resourceType": "Observation", "id": oid, "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "subject": {"reference": f"Patient/{patient}"}, "effectiveDateTime": "2026-01-01T10:00:00Z",
            "valueQuantity": {"value": value, "unit": "/min"}}


def risk(rid, patient):
    return {"resourceType": "RiskAssessment", "id": rid, "status": "final",
            "subject": {"reference": f"Patient/{patient}"}, "occurrenceDateTime": "2026-01-01T11:00:00Z",
            "prediction": [{"probabilityDecimal": 0.3}]}


async def wait_for(predicate, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


@pytest.fixture
async def js(nats_url):
    nc = await nats.connect(nats_url)
    yield nc.jetstream()
    await nc.drain()


@pytest.fixture
def store(tmp_path):
    s = build_store(f"sqlite:///{tmp_path}/gw.db")
    s.migrate()
    yield s
    s.close()


async def publish(js, subject, resources, msg_id=None):
    await js.publish(subject, bus.encode_bundle(resources),
                     headers={bus.MSG_ID: msg_id or uuid.uuid4().hex, "Content-Type": bus.CONTENT_TYPE})


async def test_consume_store_ack_and_idempotent_redelivery(js, store):
    patient = "p-" + uuid.uuid4().hex[:8]
    name = "test-gw-" + uuid.uuid4().hex[:8]
    consumer = BusConsumer(js, store, name, fetch_timeout=0.2)
    await consumer.start()
    try:
        assert consumer.running
        batch = [observation(f"{patient}-o{i}", patient) for i in range(3)]
        await publish(js, bus.observation_subject(patient), batch)
        await publish(js, bus.risk_subject(patient), [risk(f"{patient}-r1", patient)])
        await wait_for(lambda: store.read("Observation", f"{patient}-o2") is not None
                       and store.read("RiskAssessment", f"{patient}-r1") is not None)
        assert store.search("Observation", subject=f"Patient/{patient}")[0] == 3

        # the same bundle again (a producer retry outside the duplicate window): no new version
        await publish(js, bus.observation_subject(patient), batch)
        await wait_for(lambda: consumer.stats.resources_unchanged >= 3)
        assert store.read("Observation", f"{patient}-o0")["meta"]["versionId"] == "1"

        # changed content: a new version
        await publish(js, bus.observation_subject(patient), [observation(f"{patient}-o0", patient, 99.0)])
        await wait_for(lambda: store.read("Observation", f"{patient}-o0")["meta"]["versionId"] == "2")

        # a malformed message is terminated, not redelivered forever, and does not block the stream
        await js.publish(bus.observation_subject(patient), b"{not json")
        await js.publish(bus.observation_subject(patient), bus.encode_bundle([{"resourceType": "Observation"}]))
        await publish(js, bus.observation_subject(patient), [observation(f"{patient}-after", patient)])
        await wait_for(lambda: store.read("Observation", f"{patient}-after") is not None)
        assert consumer.stats.messages_terminated == 2

        for _ in range(100):  # acks are asynchronous: wait until the server has them all
            info = await js.consumer_info(bus.OBSERVATIONS_STREAM, consumer.durable_name("observations"))
            if info.num_ack_pending == 0 and info.num_pending == 0:
                break
            await asyncio.sleep(0.05)
        assert info.num_ack_pending == 0 and info.num_pending == 0
    finally:
        await consumer.stop()
    assert not consumer.running


async def test_durable_resumes_and_full_replay_is_harmless(js, store):
    patient = "p-" + uuid.uuid4().hex[:8]
    name = "test-gw-" + uuid.uuid4().hex[:8]
    consumer = BusConsumer(js, store, name, fetch_timeout=0.2)
    await consumer.start()
    await publish(js, bus.observation_subject(patient), [observation(f"{patient}-a", patient)])
    await wait_for(lambda: store.read("Observation", f"{patient}-a") is not None)
    await consumer.stop()

    # published while the gateway is down: picked up by the same durable on restart
    await publish(js, bus.observation_subject(patient), [observation(f"{patient}-b", patient)])
    consumer = BusConsumer(js, store, name, fetch_timeout=0.2)
    await consumer.start()
    try:
        await wait_for(lambda: store.read("Observation", f"{patient}-b") is not None)
        await asyncio.sleep(0.5)
        assert consumer.stats.resources_new == 1 and consumer.stats.resources_unchanged == 0
    finally:
        await consumer.stop()

    # a brand-new durable replays the whole stream into the same store: nothing new is versioned
    replay = BusConsumer(js, store, "test-replay-" + uuid.uuid4().hex[:8], fetch_timeout=0.2)
    await replay.start()
    try:
        await wait_for(lambda: replay.stats.resources_unchanged >= 2)
        assert store.read("Observation", f"{patient}-a")["meta"]["versionId"] == "1"
        assert store.read("Observation", f"{patient}-b")["meta"]["versionId"] == "1"
    finally:
        await replay.stop()


async def test_backlog_is_stored_in_order_across_a_stop_with_a_batch_fetched_ahead(js, store):
    """With a backlog the consumer fetches (and prepares) the next batch while one is stored. Every
    message still updates the store in stream order, and a stop with a batch fetched ahead hands
    that batch back (nak): after a restart on the same durable every message is stored, once, in order."""
    patient = "p-" + uuid.uuid4().hex[:8]
    name = "test-gw-" + uuid.uuid4().hex[:8]
    n = 1000
    await bus.ensure_streams(js)
    for i in range(n):  # each message a new version of one Observation (value i), plus one of its own
        await publish(js, bus.observation_subject(patient),
                      [observation(f"{patient}-shared", patient, float(i)), observation(f"{patient}-o{i}", patient)])
    consumer = BusConsumer(js, store, name, batch=5, fetch_timeout=0.2)
    await consumer.start()
    await wait_for(lambda: consumer.stats.messages_acked >= 10)
    await consumer.stop()
    stopped_at = consumer.stats.messages_acked
    assert stopped_at < n, "the backlog was gone before the stop: make it larger"
    consumer = BusConsumer(js, store, name, batch=5, fetch_timeout=0.2)
    await consumer.start()
    try:
        await wait_for(lambda: store.read("Observation", f"{patient}-o{n - 1}") is not None, timeout=60)
    finally:
        await consumer.stop()
    assert store.search("Observation", subject=f"Patient/{patient}", count=0)[0] == n + 1
    total, versions = store.history("Observation", f"{patient}-shared", count=n, offset=0)
    values = [v["valueQuantity"]["value"] for _, v in sorted(versions, key=lambda e: int(e[1]["meta"]["versionId"]))]
    assert values == [float(i) for i in range(n)]  # every message applied once, in stream order
    assert total == n
