"""The inference worker: VIGIL_OBSERVATIONS + VIGIL_EHR -> features -> models -> RiskAssessments on VIGIL_RISK.

Durable pull consumers (explicit acks) read Observation Bundles (VIGIL_OBSERVATIONS) and the EHR's
Patient/Encounter resources (VIGIL_EHR, one resource per message; Device is ignored). Per step:
  1. EHR messages update the patient's demographics (vigil.ehr.demographics over the Patient, the ICU
     Encounter - the one with partOf - and the hospital Encounter it is part of; encounters map to the
     patient through their subject reference). When the demographics of a patient change, every
     interval already scored for that patient is re-scored (a new version of each RiskAssessment).
  2. Observations are added to their patient's `PatientState` (idempotent per Observation id).
  3. For every (patient, scoring interval) touched, the feature row is computed from data with
     effective time < the interval's end only, plus demographics and hours in ICU (interval end - ICU
     admission). ONE batched call to the model (probability + top-5 SHAP contributions).
  4. Per (patient, interval) two RiskAssessments: `vigil-sepsis` (the model) and `vigil-news2` (the
     rule-based NEWS2 score from the same last-known values; probabilityDecimal = NEWS2 / 20, high at
     NEWS2 >= 5). Published to risk_subject(patient) with Nats-Msg-Id
     "<ra id>/<model version>/<n observations so far>/<demographics digest>": an identical re-score
     (redelivery) is dropped by JetStream's duplicate window; new data, new demographics or a new model
     version make a new message (and a new version of the same RiskAssessment id in the gateway).
     Plus `vigil-vitals-anomaly` (vigil_inference.anomaly) for intervals where HR/SBP/MAP jumped
     against the patient's own baseline (flagged intervals only).
  5. Await every publish ack, THEN ack the consumed messages (failure -> redelivery).

Ordering of demographics vs readings: readings are scored as soon as they arrive, with NaN
demographics when the EHR has not written them yet; when they arrive, all the patient's intervals are
re-scored. So the final version of every RiskAssessment equals the offline score.

Intervals with no new data get no assessment: a score is not carried forward to later hours (the last
assessment's occurrencePeriod says which hour it covers).

Horizontal scaling: `partitions` N > 1 runs N replicas, replica i owning the patients with
partition_of(patient, N) == i. Each replica has its own durable consumers (names suffixed -p<i>of<N>),
reads every message and acks, without processing, those of other partitions. Per-patient order is
the stream order (one consumer, batches processed in order); a patient's state lives in exactly one
replica. (Reading everything N times is the price of simplicity; NATS subject-transform partitions
are the next step when the stream gets large.)

State across restarts: on start, if the durable consumer already exists, the per-patient state is
rebuilt from both streams (an ephemeral consumer over the whole stream, no scoring) before consuming;
a new durable (DeliverPolicy.ALL) replays the stream anyway. Nothing connects at import time.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
from dataclasses import dataclass

import numpy as np

from vigil import bus, ehr, telemetry, tracing
from vigil.settings import Settings
from vigil_inference import anomaly, health
from vigil_inference import features as F
from vigil_inference.features import PatientState, observation_event
from vigil_inference.health import WorkerHealth
from vigil_inference.riskassessment import BASIS_CAP, build_risk_assessment

log = logging.getLogger("vigil.inference.worker")
NEWS2_MODEL = "vigil-news2"
NEWS2_VERSION = "rcp-2017"
NEWS2_ALERT = 5.0
NEWS2_MAX = 20.0
ANOMALY_MODEL = "vigil-vitals-anomaly"
ANOMALY_VERSION = "robust-z-1"


def partition_of(patient_id: str, partitions: int) -> int:
    """Stable partition of a patient (blake2b of the id, not Python's salted hash)."""
    if partitions <= 1:
        return 0
    return int.from_bytes(hashlib.blake2b(patient_id.encode(), digest_size=8).digest(), "big") % partitions


def _ref_id(ref: str | None, rtype: str) -> str | None:
    if ref and ref.startswith(f"{rtype}/"):
        return ref[len(rtype) + 1:]
    return None


def _same(a: dict, b: dict) -> bool:
    """Equal dicts of floats, NaN equal to NaN."""
    if a.keys() != b.keys():
        return False
    return all(x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))
               for x, y in ((a[k], b[k]) for k in a))


def _digest(static: dict) -> str:
    if not static:
        return "-"
    text = ",".join(f"{k}={static[k]!r}" for k in sorted(static))
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


@dataclass(frozen=True)
class Published:
    patient_id: str
    interval_index: int
    risk_assessment: dict
    msg_id: str


class Worker:
    def __init__(self, js, model_client, settings: Settings, *, batch_size: int = 1000,
                 fetch_timeout: float = 1.0, ack_wait: float = 120.0,
                 filter_subject: str = bus.OBSERVATIONS_SUBJECTS, ehr_filter_subject: str = bus.EHR_SUBJECTS,
                 partition: int = 0, partitions: int = 1, news2: bool = True, explain: bool = True,
                 anomaly: bool = True, health: WorkerHealth | None = None):
        if not 0 <= partition < max(partitions, 1):
            raise ValueError("partition must be in [0, partitions)")
        self.js = js
        self.model = model_client
        self.settings = settings
        self.batch_size = batch_size
        self.fetch_timeout = fetch_timeout
        self.ack_wait = ack_wait
        self.filter_subject = filter_subject  # narrower only in tests (one test's patients)
        self.ehr_filter_subject = ehr_filter_subject
        self.partition, self.partitions = partition, max(partitions, 1)
        self.news2, self.explain, self.anomaly = news2, explain, anomaly
        self.states: dict[str, PatientState] = {}
        self.patients: dict[str, dict] = {}  # Patient id -> Patient
        self.encounters: dict[str, dict] = {}  # Encounter id -> Encounter
        self.patient_encounters: dict[str, set[str]] = {}
        self._sub = None
        self._ehr_sub = None
        self._meta: dict | None = None
        self._names = F.feature_names()
        self._news2_col = self._names.index("news2_partial")
        self._lag = {"observations": 0, "ehr": 0}
        # what /healthz and /readyz report (vigil_inference.health)
        self.health = health or WorkerHealth(stall_seconds=settings.worker_stall_seconds)
        meter = telemetry.meter()
        self._m_readings = meter.create_counter(
            "vigil.worker.readings", unit="{observation}", description="Observations consumed (this partition)")
        self._m_out = meter.create_counter(
            "vigil.worker.risk_assessments", unit="{resource}", description="RiskAssessments published")
        self._m_batch = meter.create_histogram(
            "vigil.worker.batch.size", unit="{message}", description="Bus messages per fetch")
        self._m_rows = meter.create_histogram(
            "vigil.model.batch.size", unit="{row}", description="Feature rows per model call")
        self._m_latency = meter.create_histogram(
            "vigil.model.latency", unit="s", description="Model call latency (BentoML HTTP or in-process)")
        meter.create_observable_gauge(
            "vigil.worker.consumer.lag", callbacks=[self._observe_lag], unit="{message}",
            description="Messages pending on the worker's durable consumers (num_pending at the last fetch)")

    def _observe_lag(self, _options):
        from opentelemetry.metrics import Observation

        return [Observation(v, {"consumer": k}) for k, v in self._lag.items()]

    @property
    def durable(self) -> str:
        name = self.settings.worker_name
        return name if self.partitions == 1 else f"{name}-p{self.partition}of{self.partitions}"

    def owns(self, patient_id: str) -> bool:
        return partition_of(patient_id, self.partitions) == self.partition

    async def start(self) -> None:
        """Ensure the streams, bind the durable pull consumers and read the model's metadata."""
        if self._sub is None:
            await self._bind()
        meta = await self.model.metadata()
        names = meta.get("feature_names")
        if names is not None and list(names) != self._names:
            raise RuntimeError(f"model {meta.get('name')}:{meta.get('version')} was trained on {len(names)} "
                               f"features, this worker computes {len(self._names)}: retrain (vigil train)")
        self._meta = meta
        self.health.started = True

    async def _bind(self) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        from nats.js.errors import NotFoundError

        await bus.ensure_streams(self.js, replicas=self.settings.stream_replicas)
        existed = True
        try:
            await self.js.consumer_info(bus.OBSERVATIONS_STREAM, self.durable)
        except NotFoundError:
            existed = False
        if existed:
            await self.rebuild()
        cfg = ConsumerConfig(durable_name=self.durable, ack_policy=AckPolicy.EXPLICIT,
                             deliver_policy=DeliverPolicy.ALL, ack_wait=self.ack_wait,
                             max_ack_pending=20 * self.batch_size)
        self._sub = await self.js.pull_subscribe(self.filter_subject, durable=self.durable,
                                                 stream=bus.OBSERVATIONS_STREAM, config=cfg)
        ehr_name = f"{self.durable}-ehr"
        ecfg = ConsumerConfig(durable_name=ehr_name, ack_policy=AckPolicy.EXPLICIT,
                              deliver_policy=DeliverPolicy.ALL, ack_wait=self.ack_wait,
                              max_ack_pending=20 * self.batch_size)
        self._ehr_sub = await self.js.pull_subscribe(self.ehr_filter_subject, durable=ehr_name,
                                                     stream=bus.EHR_STREAM, config=ecfg)

    async def _read_all(self, stream: str, subject: str) -> list[bytes]:
        """Every message of `stream` matching `subject` (an ephemeral consumer, nothing acked)."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        info = await self.js.stream_info(stream)
        if info.state.messages == 0:
            return []
        sub = await self.js.pull_subscribe(subject, stream=stream, config=ConsumerConfig(
            ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, inactive_threshold=60.0))
        out: list[bytes] = []
        try:
            while True:
                try:
                    msgs = await sub.fetch(self.batch_size, timeout=1.0)
                except TimeoutError:
                    break
                out += [m.data for m in msgs]
                self.health.progress()  # a long rebuild is progress, not a stall
                if msgs and msgs[-1].metadata.num_pending == 0:
                    break
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return out

    async def rebuild(self) -> None:
        """Per-patient state (readings and demographics) from the streams, without scoring."""
        ehr = await self._read_all(bus.EHR_STREAM, self.ehr_filter_subject)
        self._apply_ehr(ehr)
        obs = await self._read_all(bus.OBSERVATIONS_STREAM, self.filter_subject)
        self._apply_observations(obs, consumed=False)
        log.info("rebuilt state of %d patients from %d observation and %d EHR messages",
                 len(self.states), len(obs), len(ehr))

    # --- state updates -------------------------------------------------------------------------

    def _apply_ehr(self, bodies: list[bytes]) -> set[str]:
        """Record Patient/Encounter resources; the patients whose demographics changed."""
        affected: set[str] = set()
        for body in bodies:
            try:
                resources = bus.decode_bundle(body)
            except ValueError:
                continue
            for res in resources:
                rtype, rid = res.get("resourceType"), res.get("id")
                if not rid:
                    continue
                if rtype == "Patient":
                    pid = rid
                    self.patients[rid] = res
                elif rtype == "Encounter":
                    pid = _ref_id(res.get("subject", {}).get("reference"), "Patient")
                    if pid is None:
                        continue
                    self.encounters[rid] = res
                    self.patient_encounters.setdefault(pid, set()).add(rid)
                else:
                    continue
                if self.owns(pid):
                    affected.add(pid)
        changed = set()
        for pid in affected:
            demo = self.demographics(pid)
            state = self.states.setdefault(pid, PatientState())
            if not _same(demo, state.static):
                state.static = demo
                changed.add(pid)
        return changed

    def demographics(self, patient_id: str) -> dict[str, float]:
        encs = [self.encounters[e] for e in sorted(self.patient_encounters.get(patient_id, ()))]
        icu = next((e for e in encs if e.get("partOf")), None)
        hospital = None
        if icu is not None:
            hid = _ref_id(icu["partOf"].get("reference"), "Encounter")
            hospital = self.encounters.get(hid) if hid else None
        return ehr.demographics(self.patients.get(patient_id), icu, hospital)

    def _apply_observations(self, bodies: list[bytes], *, consumed: bool = True) -> dict[str, set[int]]:
        interval_s = self.settings.score_interval_seconds
        touched: dict[str, set[int]] = {}
        n = 0
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
                if not self.owns(patient):
                    continue
                state = self.states.setdefault(patient, PatientState())
                state.add(interval, key, value, effective, obs_id)
                n += 1
                # Touched even when the Observation was already known: a redelivery after a failed
                # publish must publish again (an identical result is deduplicated by its msg id).
                touched.setdefault(patient, set()).add(interval)
        if n and consumed:  # not counted when rebuilding state at start
            self._m_readings.add(n)
        return touched

    def _anomaly(self, patient: str, interval: int, start: int, basis: list[str], n_seen: int) -> list[Published]:
        """A `vigil-vitals-anomaly` RiskAssessment when HR/SBP/MAP jumped vs the personal baseline."""
        g, _ = self.states[patient].grid(interval)
        if not len(g):
            return []
        flagged = anomaly.flags(anomaly.vital_z_scores(g)[-1])
        if not flagged:
            return []
        zmax = max(abs(z) for _, z in flagged)
        ra = build_risk_assessment(
            patient_id=patient, model_name=ANOMALY_MODEL, model_version=ANOMALY_VERSION, interval_start=start,
            interval_end=start + self.settings.score_interval_seconds, probability=min(zmax / (2 * anomaly.Z_ALERT), 1.0),
            threshold=0.5, basis=basis, outcome_coding=[], outcome_text="Sudden change of vital signs vs the "
            "patient's own baseline", rationale="; ".join(f"{k} robust z {z:+.1f}" for k, z in flagged)
            + f" (|z| >= {anomaly.Z_ALERT:g}; probabilityDecimal = max|z| / {2 * anomaly.Z_ALERT:g}, capped at 1)")
        if not ra["prediction"][0]["outcome"]["coding"]:
            del ra["prediction"][0]["outcome"]["coding"]
        return [Published(patient, interval, ra, f"{ra['id']}/{ANOMALY_VERSION}/{n_seen}")]

    # --- the loop ------------------------------------------------------------------------------

    async def _fetch(self, sub, timeout: float) -> list:
        if sub is None:
            return []
        try:
            return await sub.fetch(self.batch_size, timeout=timeout)
        except TimeoutError:  # nats-py raises its TimeoutError or, in one path, asyncio's (both builtin)
            return []

    def _note_lag(self, name: str, msgs: list) -> None:
        if not msgs:
            self._lag[name] = 0  # the fetch timed out: nothing was pending
            return
        with contextlib.suppress(Exception):
            self._lag[name] = msgs[-1].metadata.num_pending

    async def step(self) -> list[Published]:
        """Fetch one batch of each stream, score and publish; [] when idle."""
        ehr_msgs = await self._fetch(self._ehr_sub, min(0.05, self.fetch_timeout))
        msgs = await self._fetch(self._sub, self.fetch_timeout)
        self._note_lag("ehr", ehr_msgs)
        self._note_lag("observations", msgs)
        if not msgs and not ehr_msgs:
            return []
        self._m_batch.record(len(msgs) + len(ehr_msgs))
        # One CONSUMER span per fetch: parent = the first message's context (Observations first),
        # links to every message; the model call and the RiskAssessment publishes are its children.
        with tracing.process_span("vigil.observations", [m.headers for m in msgs + ehr_msgs]):
            published = await self.process([m.data for m in msgs], [m.data for m in ehr_msgs])
        for m in ehr_msgs + msgs:
            await m.ack()
        return published

    async def _predict(self, x: np.ndarray, explain: bool) -> np.ndarray:
        """The model call in a CLIENT span (its traceparent goes to BentoML in the HTTP headers)."""
        from opentelemetry.trace import SpanKind

        op = "predict_explain" if explain else "predict"
        t0 = telemetry.now()
        with tracing.tracer().start_as_current_span(f"model {op}", kind=SpanKind.CLIENT, attributes={
                "vigil.model.name": self.settings.model_name, "vigil.model.rows": len(x),
                "server.address": getattr(self.model, "url", "in-process")}):
            out = await (self.model.predict_explain(x) if explain else self.model.predict(x))
        self._m_latency.record(telemetry.now() - t0, {"operation": op})
        self._m_rows.record(len(x))
        return out

    async def _publish(self, p: Published) -> None:
        subject = bus.risk_subject(p.patient_id)
        with tracing.publish_span(subject):
            await self.js.publish(subject, bus.encode_bundle([p.risk_assessment]), stream=bus.RISK_STREAM,
                                  headers=tracing.inject({bus.MSG_ID: p.msg_id}))

    async def process(self, bodies: list[bytes], ehr_bodies: list[bytes] = ()) -> list[Published]:
        """Score and publish the (patient, interval) pairs touched by these bus messages."""
        interval_s = self.settings.score_interval_seconds
        changed = self._apply_ehr(list(ehr_bodies))
        touched = self._apply_observations(bodies)
        for pid in changed:  # new demographics: re-score every interval with data
            st = self.states[pid]
            touched.setdefault(pid, set()).update(i for i, _ in st.cells)
        touched = {p: t for p, t in touched.items() if t}
        if not touched:
            return []

        keys: list[tuple[str, int]] = []
        rows: list[np.ndarray] = []
        for patient in sorted(touched):
            feats = self.states[patient].features(touched[patient], interval_s)
            for interval in sorted(feats):
                keys.append((patient, interval))
                rows.append(feats[interval])
        if not rows:
            return []
        x = np.vstack(rows)
        explained = None
        if self.explain and hasattr(self.model, "predict_explain"):
            explained = await self._predict(x, True)
            probs = explained[:, 0]
        else:
            probs = await self._predict(x, False)

        meta = self._meta or await self.model.metadata()
        name, version, threshold = self.settings.model_name, str(meta["version"]), float(meta["threshold"])
        out: list[Published] = []
        for k, ((patient, interval), p) in enumerate(zip(keys, probs, strict=True)):
            state = self.states[patient]
            basis, n_seen = state.basis(interval, BASIS_CAP)
            digest = _digest(state.static)
            start = interval * interval_s
            contributions = None
            if explained is not None and explained.shape[1] > 1:
                contributions = [(self._names[int(i)], float(x[k, int(i)]), float(c))
                                 for i, c in zip(explained[k, 1::2], explained[k, 2::2], strict=True)]
            ra = build_risk_assessment(patient_id=patient, model_name=name, model_version=version,
                                       interval_start=start, interval_end=start + interval_s,
                                       probability=min(max(float(p), 0.0), 1.0), threshold=threshold,
                                       basis=basis, contributions=contributions)
            out.append(Published(patient, interval, ra, f"{ra['id']}/{version}/{n_seen}/{digest}"))
            if self.news2:
                score = float(x[k, self._news2_col])
                nra = build_risk_assessment(
                    patient_id=patient, model_name=NEWS2_MODEL, model_version=NEWS2_VERSION,
                    interval_start=start, interval_end=start + interval_s, probability=score / NEWS2_MAX,
                    threshold=NEWS2_ALERT / NEWS2_MAX, basis=basis,
                    rationale=f"NEWS2 {score:g} from the last known vital signs (consciousness not "
                              f"recorded, scored 0); probabilityDecimal = NEWS2/20, high at NEWS2 >= 5")
                out.append(Published(patient, interval, nra, f"{nra['id']}/{NEWS2_VERSION}/{n_seen}"))
            if self.anomaly:
                out += self._anomaly(patient, interval, start, basis, n_seen)
        await asyncio.gather(*(self._publish(p) for p in out))
        self._m_out.add(len(out))
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
            except Exception as exc:
                log.exception("scoring a batch failed; its messages will be redelivered")
                self.health.progress(error=repr(exc))
                await asyncio.sleep(1.0)
                continue
            self.health.progress()
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

    from vigil.telemetry import setup_telemetry
    from vigil_inference.client import ModelClient

    setup_telemetry("vigil-worker")
    client = model_client or ModelClient(settings.bentoml_url, ca=settings.model_tls_ca)
    state = WorkerHealth(stall_seconds=settings.worker_stall_seconds)

    async def disconnected() -> None:
        state.connected = False

    async def reconnected() -> None:
        state.connected = True

    nc = await nats.connect(settings.nats_url, name=settings.worker_name, disconnected_cb=disconnected,
                            reconnected_cb=reconnected)
    worker = Worker(nc.jetstream(), client, settings, health=state, **worker_options)
    probes = await health.serve(state, settings.worker_health_listen) if settings.worker_health_listen else None
    try:
        while True:  # wait for the model service (it may start after the worker)
            try:
                await worker.start()
                break
            except Exception as exc:
                if worker._sub is not None:
                    log.warning("model service at %s not ready (%s); retrying", settings.bentoml_url, exc)
                    state.progress(error=f"model service not ready: {exc!r}")
                    await asyncio.sleep(2.0)
                else:
                    raise
        await worker.run_forever(ready)
    finally:
        if probes is not None:
            probes.close()
        await worker.stop()
        with contextlib.suppress(Exception):
            await nc.drain()
        await client.aclose()
