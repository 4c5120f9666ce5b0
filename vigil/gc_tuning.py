"""The cyclic garbage collector's settings for the long-running services (gateway, ingest, worker).

The services allocate many short-lived containers: every bus message becomes dicts and lists (decoded
FHIR JSON), every index row a tuple. These are freed by reference counting; they form no cycles. But
CPython starts a young-generation collection every 700 net container allocations (its default
thresholds are 700, 10, 10), and the older generations walk every long-lived object (imported modules,
the app, the batches in flight). Profiled in the bench's pipeline scenario, 42 % of the gateway's
interpreter time went to the collector.

`tune(text)` (`VIGIL_GC_THRESHOLDS`, default "50000,20,100") moves what start-up created into the
permanent generation (`gc.freeze()`: never walked again) and raises the thresholds. Cycles are still
collected, less often. An empty value leaves the collector as CPython sets it.
"""
from __future__ import annotations

import gc
import logging

log = logging.getLogger("vigil.gc")

DEFAULT = "50000,20,100"


def parse_thresholds(text: str) -> tuple[int, int, int] | None:
    """(gen0, gen1, gen2) from "gen0,gen1,gen2" (positive integers), None for an empty value; else
    ValueError naming the setting."""
    text = (text or "").strip()
    if not text:
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or any(v < 1 for v in values):
        raise ValueError(f"VIGIL_GC_THRESHOLDS must be three positive integers gen0,gen1,gen2 "
                         f"(e.g. {DEFAULT}) or empty for CPython's defaults, not {text!r}")
    return values  # type: ignore[return-value]


def tune(text: str) -> tuple[int, int, int] | None:
    """Apply VIGIL_GC_THRESHOLDS once the service's modules are imported: freeze what exists, set
    the thresholds. Returns the thresholds set (None: left as they were). A bad value stops the
    service before it serves (SystemExit with the reason)."""
    try:
        thresholds = parse_thresholds(text)
    except ValueError as exc:
        raise SystemExit(f"vigil: {exc}") from None
    if thresholds is None:
        return None
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)
    log.info("gc thresholds %s; %d start-up objects frozen", ",".join(map(str, thresholds)),
             gc.get_freeze_count())
    return thresholds
