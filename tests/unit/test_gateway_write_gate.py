"""store.WriteGate: a writer that is not a bus batch goes before every waiting bus batch; reentrant."""
from __future__ import annotations

import threading
import time

from vigil_gateway.bootstrap import build_store
from vigil_gateway.store import WriteGate


def _start(gate: WriteGate, name: str, bulk: bool, order: list[str], hold: threading.Event | None = None):
    entered = threading.Event()

    def run():
        with gate.hold(bulk=bulk):
            order.append(name)
            entered.set()
            if hold is not None:
                hold.wait(10)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, entered


def _wait_until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


def test_rest_writer_goes_before_queued_bus_batches():
    gate, order = WriteGate(), []
    release = threading.Event()
    first, entered = _start(gate, "bus-1", True, order, release)
    assert entered.wait(10)
    # two more bus batches queue up first, then a REST write arrives
    bus2, _ = _start(gate, "bus-2", True, order)
    bus3, _ = _start(gate, "bus-3", True, order)
    time.sleep(0.05)
    rest, _ = _start(gate, "rest", False, order)
    _wait_until(lambda: gate.waiting == 1)
    release.set()
    for t in (first, bus2, bus3, rest):
        t.join(10)
    assert order[:2] == ["bus-1", "rest"], order
    assert sorted(order[2:]) == ["bus-2", "bus-3"]


def test_bulk_waits_while_any_rest_writer_is_queued():
    gate, order = WriteGate(), []
    release_a, release_b = threading.Event(), threading.Event()
    a, entered = _start(gate, "rest-a", False, order, release_a)
    assert entered.wait(10)
    bulk, _ = _start(gate, "bus", True, order)
    b, _ = _start(gate, "rest-b", False, order, release_b)
    _wait_until(lambda: gate.waiting == 1)
    release_a.set()
    _wait_until(lambda: len(order) == 2)
    assert order == ["rest-a", "rest-b"]  # the bus batch did not slip in between
    release_b.set()
    for t in (a, bulk, b):
        t.join(10)
    assert order == ["rest-a", "rest-b", "bus"]


def test_reentrant_and_store_writes_use_it(tmp_path):
    gate = WriteGate()
    with gate.hold(bulk=True), gate.hold(), gate.hold(bulk=True):
        pass
    # the gate is free again: another thread gets it at once
    t, entered = _start(gate, "x", False, [])
    assert entered.wait(10)
    t.join(10)

    store = build_store(f"sqlite:///{tmp_path}/g.db")
    store.migrate()
    try:
        with store._gate.hold(bulk=True):  # a bus batch holds the store: a REST write queues behind it
            done = threading.Event()
            w = threading.Thread(target=lambda: (store.write({"resourceType": "Patient"}, create=True), done.set()),
                                 daemon=True)
            w.start()
            _wait_until(lambda: store._gate.waiting == 1)
            assert not done.is_set()
        w.join(10)
        assert done.is_set()
        assert store.search("Patient")[0] == 1
    finally:
        store.close()


def test_consumer_splits_a_fetch_into_short_transactions_of_whole_messages():
    from vigil_gateway.consumer import _transactions

    msgs = [(f"m{i}", [{}] * n) for i, n in enumerate([400, 400, 400, 2500, 10, 990, 1])]
    parts = [[m for m, _ in part] for part in _transactions(msgs, 1000)]
    assert parts == [["m0", "m1"], ["m2"], ["m3"], ["m4", "m5"], ["m6"]]  # a message bigger than the bound alone
    assert [m for part in parts for m in part] == [m for m, _ in msgs]
    assert list(_transactions([], 1000)) == []
