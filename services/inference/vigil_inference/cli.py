"""`vigil train | evaluate | export | worker | serve-model` (wired into the `vigil` command by vigil/cli.py)."""
from __future__ import annotations

import argparse
import os
import sys


def _train(args: argparse.Namespace) -> int:
    from vigil_inference.train import train

    r = train(args.data, limit=args.limit, quick=args.quick, seed=args.seed, folds=args.folds,
              nthread=args.nthread, card_dir=None if args.no_card else args.card_dir)
    print(f"{r.tag}: {r.n_folds}-fold CV AUROC {r.auroc:.3f} [{r.auroc_ci[0]:.3f}, {r.auroc_ci[1]:.3f}], "
          f"utility {r.utility:.3f} (pooled-threshold CI [{r.utility_ci[0]:.3f}, {r.utility_ci[1]:.3f}]), "
          f"threshold {r.threshold:.4f} ({r.n_stays} stays, {r.seconds:.1f}s)")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from vigil_inference.evaluate import evaluate, evaluate_live, format_table

    if args.live:
        res = evaluate_live(args.data, fhir_base=args.fhir_base, target=args.target, limit=args.limit,
                            model_tag=args.model, n_boot=args.bootstrap, token=args.token)
    else:
        res = evaluate(args.data, model_tag=args.model, limit=args.limit, n_boot=args.bootstrap)
    print(format_table(res))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1, default=float)
    return 0


def _export(args: argparse.Namespace) -> int:
    from vigil_inference.portable import export

    out = export(args.out, model_tag=args.model)
    print(f"exported to {out}")
    return 0


def _worker(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from vigil import gc_tuning
    from vigil.settings import Settings
    from vigil_inference.worker import run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings.from_env(nats_url=args.nats_url, bentoml_url=args.bentoml_url)
    gc_tuning.tune(settings.gc_thresholds)
    try:
        asyncio.run(run(settings, partition=args.partition, partitions=args.partitions))
    except KeyboardInterrupt:
        pass
    return 0


def model_server_env(settings, env: dict[str, str]) -> dict[str, str]:
    """The environment of `bentoml serve`: with VIGIL_MODEL_TLS_CERT/KEY, the service's own BentoML
    configuration turns HTTPS on (BentoML 1.4 reads TLS per service: services."<name>".ssl; its serve
    command has no TLS flags). Other BENTOML_CONFIG_OPTIONS are kept."""
    if bool(settings.model_tls_cert) != bool(settings.model_tls_key):
        raise SystemExit("serve-model: VIGIL_MODEL_TLS_CERT and VIGIL_MODEL_TLS_KEY go together")
    if not settings.model_tls_cert:
        return env
    from vigil_inference.service import SERVICE_NAME

    for path in (settings.model_tls_cert, settings.model_tls_key):
        if not os.path.isfile(path):
            raise SystemExit(f"serve-model: TLS file {path} does not exist")
        if any(c.isspace() or c == '"' for c in path):  # BENTOML_CONFIG_OPTIONS is split on whitespace
            raise SystemExit(f"serve-model: TLS file path {path!r} must not contain whitespace or quotes")
    ssl = f'services."{SERVICE_NAME}".ssl'
    options = f"{ssl}.enabled=true {ssl}.certfile={settings.model_tls_cert} {ssl}.keyfile={settings.model_tls_key}"
    return {**env, "BENTOML_CONFIG_OPTIONS": " ".join(filter(None, (env.get("BENTOML_CONFIG_OPTIONS"), options)))}


def _serve_model(args: argparse.Namespace) -> int:
    from vigil.settings import Settings

    bentoml = os.path.join(os.path.dirname(sys.executable), "bentoml")
    cmd = [bentoml, "serve", "vigil_inference.service:SepsisRisk", "--host", args.host, "--port", str(args.port)]
    os.execve(bentoml, cmd, model_server_env(Settings.from_env(), dict(os.environ)))
    return 0  # not reached


def add_commands(subparsers) -> None:
    from vigil import physionet

    p = subparsers.add_parser("train", help="train the sepsis model into the BentoML store ($BENTOML_HOME)")
    p.add_argument("--data", default=str(physionet.default_dataset()), help="PhysioNet 2019 .tar.gz or folder")
    p.add_argument("--limit", type=int, default=None, help="use only the first N stays")
    p.add_argument("--quick", action="store_true", help="small, fast model (first 2000 stays unless --limit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--folds", type=int, default=None, help="cross-validation folds (default 5; 3 with --quick)")
    p.add_argument("--nthread", type=int, default=None, help="XGBoost threads (default min(2, cpus))")
    p.add_argument("--card-dir", default="vigil-data/model-card", help="where the model card is written")
    p.add_argument("--no-card", action="store_true", help="do not write the model card")
    p.set_defaults(func=_train)

    p = subparsers.add_parser("evaluate", help="evaluate the stored model (and NEWS2/qSOFA/SIRS/time-only) "
                                               "on a PhysioNet-format set, offline or --live")
    p.add_argument("--data", default=str(physionet.default_dataset()), help="PhysioNet 2019 .tar.gz or folder")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--model", default="vigil-sepsis:latest", help="BentoML model tag")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples (over stays) for CIs")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument("--live", action="store_true", help="replay through a running pipeline, read back over FHIR")
    p.add_argument("--fhir-base", default="http://127.0.0.1:8080/fhir")
    p.add_argument("--target", default="127.0.0.1:50051", help="gRPC ingest address (--live)")
    p.add_argument("--token", default=None, help="Bearer token for the FHIR API (--live)")
    p.set_defaults(func=_evaluate)

    p = subparsers.add_parser("export", help="portable model: XGBoost JSON + a numpy-only scorer")
    p.add_argument("--model", default="vigil-sepsis:latest")
    p.add_argument("--out", default="vigil-data/export")
    p.set_defaults(func=_export)

    p = subparsers.add_parser("worker", help="run the inference worker (NATS -> model -> RiskAssessments)")
    p.add_argument("--nats-url", default=None, help="default: $VIGIL_NATS_URL or nats://127.0.0.1:4222")
    p.add_argument("--bentoml-url", default=None, help="default: $VIGIL_BENTOML_URL or http://127.0.0.1:3000")
    p.add_argument("--partition", type=int, default=0, help="this replica's partition (0..partitions-1)")
    p.add_argument("--partitions", type=int, default=1, help="number of worker replicas sharing the patients")
    p.set_defaults(func=_worker)

    p = subparsers.add_parser("serve-model", help="serve the model with BentoML (bentoml serve; HTTPS with "
                                                  "VIGIL_MODEL_TLS_CERT/KEY)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.set_defaults(func=_serve_model)
