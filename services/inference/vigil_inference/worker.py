"""The inference worker: VIGIL_OBSERVATIONS -> features -> model -> RiskAssessments on VIGIL_RISK.

One durable pull consumer (name = settings.worker_name, explicit acks) reads Observation Bundles.
Per fetched batch:
  1. decode the Bundles and add every Observation to its patient's `PatientState`;
  2. for every (patient, scoring interval) the batch touched, compute that interval's feature row from
     the data with effective time < the interval's end only (later intervals are not in the grid);
  3. ONE batched predict call for all of them;
  4. build a RiskAssessment per (patient, interval) and publish each as a Bundle to
     risk_subject(patient) with Nats-Msg-Id "<ra id>/<n>", n = the number of distinct Observations
     received for that patient up to that interval: an identical re-score (redelivery) is dropped
     by JetStream's duplicate window, new data gives a new message (and the gateway a new version of
     the same RiskAssessment id);
  5. await every publish ack, THEN ack the consumed messages. A failure before that leaves them
     unacked and JetStream redelivers them (state updates are idempotent per Observation id).

Intervals that get no new data get no assessment: a score is not carried forward to later hours.

Per-patient state lives in memory only. It is rebuilt from the stream only when the worker starts on a
new durable (the consumer is created with DeliverPolicy.ALL, so a new durable replays the whole
stream); restarting on an existing durable resumes after the last ack with empty state, so the first
scores after a restart see only newer data. Acceptable for the walking skeleton; a state snapshot or a
KV-backed state comes later. Nothing connects or reads the environment at import time.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import numpy as np

from vigil import bus
from vigil.settings import Settings
from vigil_inference.features import PatientState, observation_event
from vigil_inference.riskassessment import BASIS_CAP, build_risk_assessment

log = logging.getLogger("vigil.inference.worker")


@dataclass(frozen=True)
class Published:
    patient_id: str
    interval_index: int
    risk_assessment: dict
    msg_id: str


class Worker:
    def __init__(self, js, model_client, settings: Settings, *, batch_size: int = 1000,
                 fetch_timeout: float = 1.0, ack_wait: float = 120.0,
                 filter_subject: str = bus.OBSERVATIONS_SUBJECTS):
        self.js = js
        self.model = model_client
        self.settings = settings
        self.batch_size = batch_size
        self.fetch_timeout = fetch_timeout
        self.ack_wait = ack_wait
        self.filter_subject = filter_subject  # narrower only in tests (one test's patients)
        self.states: dict[str, PatientState] = {}
        self._sub = None
        self._meta: dict | None = None

    async def start(self) -> None:
        """Ensure the streams, bind the durable pull consumer and read the model's metadata."""
        if self._sub is None:
            await self._bind()
        self._meta = await self.model.metadata()

    async def _bind(self) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        await bus.ensure_streams(self.js, replicas=self.settings.stream_replicas)
        cfg = ConsumerConfig(durable_name=self.settings.worker_name, ack_policy=AckPolicy.EXPLICIT,
                             deliver_policy=DeliverPolicy.ALL, ack_wait=self.ack_wait,
                             max_ack_pending=20 * self.batch_size)
        self._sub = await self.js.pull_subscribe(self.filter_subject, durable=self.settings.worker_name,
                                                 stream=bus.OBSERVATIONS_STREAM, config=cfg)

    async def step(self) -> list[Published]:
        """Fetch one batch (waiting up to fetch_timeout), score and publish it; [] when idle."""
        try:
            msgs = await self._sub.fetch(self.batch_size, timeout=self.fetch_timeout)
        except TimeoutError:  # nats-py raises its TimeoutError or, in one path, asyncio's (both builtin)
            return []
        published = await self.process([m.data for m in msgs])
        for m in msgs:
            await m.ack()
        return published

    async def process(self, bodies: list[bytes]) -> list[Published]:
        """Score and publish the (patient, interval) pairs touched by these bus messages."""
        interval_s = self.settings.score_interval_seconds
        touched: dict[str, set[int]] = {}
        for body in bodies:
            try:
                resources = bus.decode_bundle(body)
            except ValueError:
                log.warning("dropping a bus message that is not a FHIR Bundle")
                continue
            for res in resources:
                if res.get("resourceType") != "Observation":
                    continue
                ev = observation_event(res, interval_s)
                if ev is None:
                    continue
                patient, interval, key, value, effective, obs_id = ev
                state = self.states.setdefault(patient, PatientState())
                state.add(interval, key, value, effective, obs_id)
                # Touched even when the Observation was already known: a redelivery after a failed
                # publish must publish again (an identical result is deduplicated by its msg id).
                touched.setdefault(patient, set()).add(interval)
        if not touched:
            return []

        keys: list[tuple[str, int]] = []
        rows: list[np.ndarray] = []
        for patient in sorted(touched):
            feats = self.states[patient].features(touched[patient])
            for interval in sorted(feats):
                keys.append((patient, interval))
                rows.append(feats[interval])
        probs = await self.model.predict(np.vstack(rows))

        meta = self._meta or await self.model.metadata()
        name, version, threshold = self.settings.model_name, str(meta["version"]), float(meta["threshold"])
        out: list[Published] = []
        for (patient, interval), p in zip(keys, probs, strict=True):
            basis, n_seen = self.states[patient].basis(interval, BASIS_CAP)
            start = interval * interval_s
            ra = build_risk_assessment(patient_id=patient, model_name=name, model_version=version,
                                       interval_start=start, interval_end=start + interval_s,
                                       probability=min(max(float(p), 0.0), 1.0), threshold=threshold,
                                       basis=basis)
            out.append(Published(patient, interval, ra, f"{ra['id']}/{n_seen}"))
        await asyncio.gather(*(
            self.js.publish(bus.risk_subject(p.patient_id), bus.encode_bundle([p.risk_assessment]),
                            stream=bus.RISK_STREAM, headers={bus.MSG_ID: p.msg_id})
            for p in out))
        return out

    async def run_forever(self, ready: asyncio.Event | None = None) -> None:
        if self._sub is None or self._meta is None:
            await self.start()
        if ready is not None:
            ready.set()
        while True:
            try:
                published = await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scoring a batch failed; its messages will be redelivered")
                await asyncio.sleep(1.0)
                continue
            if published:
                log.info("published %d risk assessments", len(published))

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None


async def run(settings: Settings, *, ready: asyncio.Event | None = None, model_client=None,
              **worker_options) -> None:
    """Connect to settings.nats_url and the model service at settings.bentoml_url; run until cancelled.

    `ready` is set once the consumer is bound and the model answered; `model_client` replaces the HTTP
    client (e.g. LocalModel); `worker_options` go to Worker (batch_size, filter_subject, ...)."""
    import nats

    from vigil_inference.client import ModelClient

    client = model_client or ModelClient(settings.bentoml_url)
    nc = await nats.connect(settings.nats_url, name=settings.worker_name)
    worker = Worker(nc.jetstream(), client, settings, **worker_options)
    try:
        while True:  # wait for the model service (it may start after the worker)
            try:
                await worker.start()
                break
            except Exception as exc:
                if worker._sub is not None:
                    log.warning("model service at %s not ready (%s); retrying", settings.bentoml_url, exc)
                    await asyncio.sleep(2.0)
                else:
                    raise
        await worker.run_forever(ready)
    finally:
        await worker.stop()
        with contextlib.suppress(Exception):
            await nc.drain()
        await client.aclose()
