"""Device registry and patient bindings, durable in a JetStream key-value bucket shared by all replicas.

One key per device, `d.<device_id>`, holds a JSON record: the vendor (OAuth client id) that owns it,
descriptive fields, and its bindings `[patient_id, start_epoch, end_epoch | null]` in start order.
Writes use the key's revision (compare-and-set), so two replicas never lose each other's updates.
Each replica keeps a read cache fed by a KV watcher; a batch that finds no binding in the cache
re-reads the key once before it is refused, so a binding made on another replica is seen at once.

Device health (`h.<device_id>`) is kept per replica in memory and written to the bucket at most every
`health_flush_seconds` per device (merged with what other replicas wrote).
"""
from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import orjson

from vigil import bus, codes
from vigil.ids import is_fhir_id

log = logging.getLogger("vigil.ingest.registry")

DEVICES_BUCKET = "VIGIL_DEVICES"
DEVICE_IDENTIFIER_SYSTEM = f"{codes.VIGIL_BASE}/NamingSystem/device"


class RegistryError(Exception):
    """Base: `kind` is one of invalid, not_found, permission, conflict, unavailable."""

    kind = "invalid"

    def __init__(self, message: str, *, field: str = "", subject: str = ""):
        super().__init__(message)
        self.field = field
        self.subject = subject


class InvalidRequest(RegistryError):
    kind = "invalid"


class DeviceNotFound(RegistryError):
    kind = "not_found"


class NotOwner(RegistryError):
    kind = "permission"


class BindingConflict(RegistryError):
    kind = "conflict"


class RegistryUnavailable(RegistryError):
    kind = "unavailable"


def _check_device_id(device_id: str, field: str = "device_id") -> None:
    if not is_fhir_id(device_id):
        raise InvalidRequest("device_id must match [A-Za-z0-9-.]{1,64}", field=field)


# -- storage port -------------------------------------------------------------------------------

class CasFailed(Exception):
    pass


class MemoryStore:
    """In-memory twin of the KV bucket (compare-and-set by revision)."""

    def __init__(self):
        self.data: dict[str, tuple[bytes, int]] = {}
        self.rev = 0

    async def get(self, key: str) -> tuple[bytes, int] | None:
        return self.data.get(key)

    async def put(self, key: str, value: bytes, last: int | None) -> int:
        cur = self.data.get(key)
        if (last is None and cur is not None) or (last is not None and (cur is None or cur[1] != last)):
            raise CasFailed(key)
        self.rev += 1
        self.data[key] = (value, self.rev)
        return self.rev

    async def put_any(self, key: str, value: bytes) -> int:
        self.rev += 1
        self.data[key] = (value, self.rev)
        return self.rev


class KVStore:
    """The JetStream KV bucket VIGIL_DEVICES (file storage, history 1)."""

    def __init__(self, kv):
        self.kv = kv

    @classmethod
    async def open(cls, js, *, replicas: int = 1) -> KVStore:
        from nats.js.api import KeyValueConfig, StorageType
        from nats.js.errors import BucketNotFoundError

        try:
            kv = await js.key_value(DEVICES_BUCKET)
        except BucketNotFoundError:
            kv = await js.create_key_value(KeyValueConfig(bucket=DEVICES_BUCKET, history=1,
                                                          storage=StorageType.FILE, replicas=replicas))
        return cls(kv)

    async def get(self, key: str) -> tuple[bytes, int] | None:
        import nats.errors
        from nats.js.errors import KeyNotFoundError

        try:
            e = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        except (TimeoutError, nats.errors.Error) as e:
            raise RegistryUnavailable(f"device registry unavailable: {type(e).__name__}") from e
        if e.value is None:
            return None
        return e.value, e.revision

    async def put(self, key: str, value: bytes, last: int | None) -> int:
        import nats.errors
        from nats.js.errors import APIError, KeyWrongLastSequenceError

        try:
            if last is None:
                return await self.kv.create(key, value)
            return await self.kv.update(key, value, last=last)
        except KeyWrongLastSequenceError as e:
            raise CasFailed(key) from e
        except APIError as e:
            if getattr(e, "err_code", None) == 10071 or "wrong last sequence" in str(e):
                raise CasFailed(key) from e
            raise RegistryUnavailable(f"device registry refused the write: {e}") from e
        except (TimeoutError, nats.errors.Error) as e:
            raise RegistryUnavailable(f"device registry unavailable: {type(e).__name__}") from e

    async def put_any(self, key: str, value: bytes) -> int:
        return await self.kv.put(key, value)

    async def watch(self, on_update: Callable[[str, bytes | None], None]) -> asyncio.Task:
        watcher = await self.kv.watch("d.>", include_history=False)

        async def loop():
            async for entry in watcher:
                if entry is None:  # end of the initial values
                    continue
                on_update(entry.key, entry.value if entry.operation is None else None)
        return asyncio.ensure_future(loop())


# -- records ------------------------------------------------------------------------------------

@dataclass
class DeviceRecord:
    device_id: str
    vendor: str
    manufacturer: str = ""
    model: str = ""
    serial_number: str = ""
    display_name: str = ""
    created: float = 0.0
    bindings: list[tuple[str, float, float | None]] = field(default_factory=list)
    revision: int = 0

    def to_json(self) -> bytes:
        return orjson.dumps({"id": self.device_id, "vendor": self.vendor, "manufacturer": self.manufacturer,
                             "model": self.model, "serial": self.serial_number, "display": self.display_name,
                             "created": self.created, "bindings": [list(b) for b in self.bindings]})

    @classmethod
    def from_json(cls, data: bytes, revision: int) -> DeviceRecord:
        d = orjson.loads(data)
        return cls(device_id=d["id"], vendor=d["vendor"], manufacturer=d.get("manufacturer", ""),
                   model=d.get("model", ""), serial_number=d.get("serial", ""), display_name=d.get("display", ""),
                   created=d.get("created", 0.0), bindings=[(p, s, e) for p, s, e in d.get("bindings", [])],
                   revision=revision)

    def patient_at(self, t: float) -> str | None:
        """Patient of the binding valid at epoch `t` (start inclusive, end exclusive)."""
        starts = [b[1] for b in self.bindings]
        i = bisect.bisect_right(starts, t) - 1
        if i < 0:
            return None
        patient, _start, end = self.bindings[i]
        if end is not None and t >= end:
            return None
        return patient

    def current_patient(self, now: float | None = None) -> str | None:
        now = time.time() if now is None else now
        for patient, start, end in reversed(self.bindings):
            if start <= now and (end is None or now < end):
                return patient
        return None


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def device_resource(rec: DeviceRecord, health: dict | None = None) -> dict:
    """FHIR R4 Device (https://hl7.org/fhir/R4/device.html) for a registered device."""
    dev: dict = {
        "resourceType": "Device",
        "id": rec.device_id,
        "identifier": [{"system": DEVICE_IDENTIFIER_SYSTEM, "value": rec.device_id}],
        "status": "active",
    }
    if rec.manufacturer:
        dev["manufacturer"] = rec.manufacturer
    if rec.serial_number:
        dev["serialNumber"] = rec.serial_number
    names = []
    if rec.display_name:
        names.append({"name": rec.display_name, "type": "user-friendly-name"})
    if rec.model:
        names.append({"name": rec.model, "type": "model-name"})
        dev["modelNumber"] = rec.model
    if names:
        dev["deviceName"] = names
    dev["owner"] = {"display": rec.vendor} if rec.vendor else None
    if dev["owner"] is None:
        del dev["owner"]
    # The open binding (if any): the patient the device is currently attached to.
    open_ = [b for b in rec.bindings if b[2] is None]
    if open_:
        dev["patient"] = {"reference": f"Patient/{open_[-1][0]}"}
    if health:
        props = []
        for key, code, unit in (("battery_percent", "battery-percent", "%"),
                                ("signal_quality", "signal-quality", "1")):
            if health.get(key) is not None:
                props.append({"type": {"coding": [{"system": f"{codes.VIGIL_BASE}/CodeSystem/device-property",
                                                   "code": code}]},
                              "valueQuantity": [{"value": health[key], "unit": unit, "system": codes.UCUM,
                                                 "code": unit}]})
        if props:
            dev["property"] = props
    return dev


@dataclass
class Health:
    last_seen: float = 0.0
    last_effective: float = 0.0
    batches: int = 0
    readings: int = 0
    gaps: int = 0
    missing: int = 0
    longest_silence: float = 0.0
    max_sequence: int = -1
    battery_percent: float | None = None
    signal_quality: float | None = None
    dirty: bool = False
    flushed: float = 0.0

    def as_dict(self) -> dict:
        return {"last_seen": self.last_seen, "last_effective": self.last_effective, "batches": self.batches,
                "readings": self.readings, "gaps": self.gaps, "missing": self.missing,
                "longest_silence": self.longest_silence, "max_sequence": self.max_sequence,
                "battery_percent": self.battery_percent, "signal_quality": self.signal_quality}


Emit = Callable[[str, bytes, str], Awaitable[None]]  # (subject, body, msg_id)


class Registry:
    def __init__(self, store, *, emit: Emit | None = None, health_flush_seconds: float = 5.0):
        self.store = store
        self.emit = emit
        self.cache: dict[str, DeviceRecord] = {}
        self.health: dict[str, Health] = {}
        self.health_flush_seconds = health_flush_seconds
        self._watch_task: asyncio.Task | None = None
        self._flush_task: asyncio.Task | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if hasattr(self.store, "watch"):
            self._watch_task = await self.store.watch(self._on_update)
        self._flush_task = asyncio.ensure_future(self._flush_loop())

    async def stop(self) -> None:
        for t in (self._watch_task, self._flush_task):
            if t is not None:
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t
        with contextlib.suppress(Exception):
            await self.flush_health(force=True)

    def _on_update(self, key: str, value: bytes | None) -> None:
        device_id = key[2:]
        if value is None:
            self.cache.pop(device_id, None)
            return
        try:
            rec = DeviceRecord.from_json(value, 0)
        except Exception:  # noqa: BLE001
            return
        old = self.cache.get(device_id)
        # the watcher has no revision handy in every client version; keep ours if it is at least as new
        if old is None or len(rec.bindings) >= len(old.bindings) or rec.bindings != old.bindings:
            rec.revision = old.revision if old is not None else 0
            self.cache[device_id] = rec

    # -- reads -------------------------------------------------------------------------------

    async def fetch(self, device_id: str) -> DeviceRecord | None:
        got = await self.store.get(f"d.{device_id}")
        if got is None:
            self.cache.pop(device_id, None)
            return None
        rec = DeviceRecord.from_json(*got)
        self.cache[device_id] = rec
        return rec

    async def lookup(self, device_id: str, *, refresh: bool = False) -> DeviceRecord | None:
        rec = None if refresh else self.cache.get(device_id)
        if rec is None:
            rec = await self.fetch(device_id)
        return rec

    async def get(self, device_id: str, vendor: str | None) -> DeviceRecord:
        _check_device_id(device_id)
        rec = await self.fetch(device_id)
        if rec is None:
            raise DeviceNotFound(f"device {device_id} is not registered", subject=f"devices/{device_id}")
        self._check_owner(rec, vendor)
        return rec

    @staticmethod
    def _check_owner(rec: DeviceRecord, vendor: str | None) -> None:
        if vendor is not None and rec.vendor != vendor:
            raise NotOwner(f"device {rec.device_id} belongs to another vendor", subject=f"devices/{rec.device_id}")

    # -- writes ------------------------------------------------------------------------------

    async def _modify(self, device_id: str, change: Callable[[DeviceRecord | None], DeviceRecord]) -> DeviceRecord:
        for _ in range(20):
            got = await self.store.get(f"d.{device_id}")
            cur = DeviceRecord.from_json(*got) if got else None
            new = change(cur)
            if cur is not None and new.to_json() == cur.to_json():
                self.cache[device_id] = cur
                return cur
            try:
                new.revision = await self.store.put(f"d.{device_id}", new.to_json(), cur.revision if cur else None)
            except CasFailed:
                continue
            self.cache[device_id] = new
            await self._emit_device(new)
            return new
        raise RegistryUnavailable(f"device {device_id}: too many concurrent updates, retry")

    async def _emit_device(self, rec: DeviceRecord) -> None:
        if self.emit is None:
            return
        h = self.health.get(rec.device_id)
        body = bus.encode_bundle([device_resource(rec, h.as_dict() if h else None)])
        await self.emit(bus.ehr_subject("Device", rec.device_id), body, f"device/{rec.device_id}/{rec.revision}")

    async def register(self, device_id: str, vendor: str, *, manufacturer: str = "", model: str = "",
                       serial_number: str = "", display_name: str = "", now: float | None = None) -> DeviceRecord:
        _check_device_id(device_id, "device.device_id")
        now = time.time() if now is None else now

        def change(cur):
            if cur is not None:
                self._check_owner(cur, vendor)
            return DeviceRecord(device_id=device_id, vendor=vendor, manufacturer=manufacturer, model=model,
                                serial_number=serial_number, display_name=display_name,
                                created=cur.created if cur else now, bindings=list(cur.bindings) if cur else [],
                                revision=cur.revision if cur else 0)
        return await self._modify(device_id, change)

    async def bind(self, device_id: str, vendor: str, patient_id: str, start: float, end: float | None
                   ) -> DeviceRecord:
        _check_device_id(device_id)
        if not is_fhir_id(patient_id):
            raise InvalidRequest("patient_id must match [A-Za-z0-9-.]{1,64}", field="binding.patient_id")
        if start <= 0:
            raise InvalidRequest("start_time is required", field="binding.start_time")
        if end is not None and end <= start:
            raise InvalidRequest("end_time must be after start_time", field="binding.end_time")

        def change(cur):
            if cur is None:
                raise DeviceNotFound(f"device {device_id} is not registered", subject=f"devices/{device_id}")
            self._check_owner(cur, vendor)
            b = (patient_id, start, end)
            if b in cur.bindings:
                return cur  # idempotent
            for p, s, e in cur.bindings:
                if start < (e if e is not None else float("inf")) and s < (end if end is not None else float("inf")):
                    raise BindingConflict(
                        f"binding overlaps the binding of device {device_id} to patient {p} from {_iso(s)}"
                        + (f" to {_iso(e)}" if e is not None else " (open-ended)"),
                        subject=f"devices/{device_id}")
            rec = DeviceRecord(**{**cur.__dict__, "bindings": sorted([*cur.bindings, b], key=lambda x: x[1])})
            return rec
        return await self._modify(device_id, change)

    async def unbind(self, device_id: str, vendor: str, end: float) -> DeviceRecord:
        _check_device_id(device_id)
        def change(cur):
            if cur is None:
                raise DeviceNotFound(f"device {device_id} is not registered", subject=f"devices/{device_id}")
            self._check_owner(cur, vendor)
            open_ = [i for i, b in enumerate(cur.bindings) if b[2] is None]
            if not open_:
                raise BindingConflict(f"device {device_id} has no open binding", subject=f"devices/{device_id}")
            i = open_[-1]
            p, s, _ = cur.bindings[i]
            if end <= s:
                raise InvalidRequest("end_time must be after the open binding's start_time", field="end_time")
            bindings = list(cur.bindings)
            bindings[i] = (p, s, end)
            return DeviceRecord(**{**cur.__dict__, "bindings": bindings})
        return await self._modify(device_id, change)

    # -- health ------------------------------------------------------------------------------

    def observe(self, device_id: str, first_seq: int, last_seq: int, count: int, last_effective: float,
                battery: float | None, signal: float | None, now: float | None = None) -> None:
        """Record an accepted (non-duplicate) batch. O(1), no I/O."""
        now = time.time() if now is None else now
        h = self.health.get(device_id)
        if h is None:
            h = self.health[device_id] = Health()
        if h.last_seen:
            h.longest_silence = max(h.longest_silence, now - h.last_seen)
        h.last_seen = now
        h.last_effective = max(h.last_effective, last_effective)
        h.batches += 1
        h.readings += count
        if h.max_sequence >= 0 and first_seq > h.max_sequence + 1:
            h.gaps += 1
            h.missing += first_seq - h.max_sequence - 1
        h.max_sequence = max(h.max_sequence, last_seq)
        if battery is not None:
            h.battery_percent = battery
        if signal is not None:
            h.signal_quality = signal
        h.dirty = True

    async def health_of(self, device_id: str) -> dict:
        """Merged health: what the bucket holds from every replica, updated with this replica's view."""
        got = None
        with contextlib.suppress(RegistryUnavailable):
            got = await self.store.get(f"h.{device_id}")
        stored = orjson.loads(got[0]) if got else {}
        mine = self.health.get(device_id)
        return _merge(stored, mine.as_dict() if mine else {})

    async def flush_health(self, *, force: bool = False) -> None:
        now = time.monotonic()
        for device_id, h in list(self.health.items()):
            if not h.dirty or (not force and now - h.flushed < self.health_flush_seconds):
                continue
            h.dirty, h.flushed = False, now
            try:
                got = await self.store.get(f"h.{device_id}")
                merged = _merge(orjson.loads(got[0]) if got else {}, h.as_dict())
                await self.store.put_any(f"h.{device_id}", orjson.dumps(merged))
            except Exception as e:  # noqa: BLE001 - best effort; next flush retries
                h.dirty = True
                log.debug("health flush for %s failed: %s", device_id, e)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_flush_seconds)
            await self.flush_health()


def _merge(stored: dict, mine: dict) -> dict:
    """Combine two health views (counts from the larger; latest times; latest reported status)."""
    if not stored:
        return dict(mine)
    if not mine:
        return dict(stored)
    newer = mine if mine.get("last_seen", 0) >= stored.get("last_seen", 0) else stored
    out = {}
    for k in ("last_seen", "last_effective", "batches", "readings", "gaps", "missing", "longest_silence",
              "max_sequence"):
        out[k] = max(stored.get(k, 0) or 0, mine.get(k, 0) or 0)
    for k in ("battery_percent", "signal_quality"):
        out[k] = newer.get(k) if newer.get(k) is not None else (stored.get(k) if newer is mine else mine.get(k))
    return out
