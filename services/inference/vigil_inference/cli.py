"""`vigil train | worker | serve-model` (wired into the `vigil` command by vigil/cli.py)."""
from __future__ import annotations

import argparse
import os
import sys


def _train(args: argparse.Namespace) -> int:
    from vigil_inference.train import train

    r = train(args.data, limit=args.limit, quick=args.quick, seed=args.seed)
    print(f"{r.tag}: test AUROC {r.auroc:.3f}, test utility {r.utility:.3f}, threshold {r.threshold:.4f} "
          f"({r.n_stays} stays, {r.seconds:.1f}s)")
    return 0


def _worker(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from vigil.settings import Settings
    from vigil_inference.worker import run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings.from_env(nats_url=args.nats_url, bentoml_url=args.bentoml_url)
    try:
        asyncio.run(run(settings))
    except KeyboardInterrupt:
        pass
    return 0


def _serve_model(args: argparse.Namespace) -> int:
    bentoml = os.path.join(os.path.dirname(sys.executable), "bentoml")
    cmd = [bentoml, "serve", "vigil_inference.service:SepsisRisk", "--host", args.host, "--port", str(args.port)]
    os.execv(bentoml, cmd)
    return 0  # not reached


def add_commands(subparsers) -> None:
    from vigil import physionet

    p = subparsers.add_parser("train", help="train the sepsis model into the BentoML store ($BENTOML_HOME)")
    p.add_argument("--data", default=str(physionet.default_dataset()), help="PhysioNet 2019 .tar.gz or folder")
    p.add_argument("--limit", type=int, default=None, help="use only the first N stays")
    p.add_argument("--quick", action="store_true", help="small, fast model (first 2000 stays unless --limit)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_train)

    p = subparsers.add_parser("worker", help="run the inference worker (NATS -> model -> RiskAssessments)")
    p.add_argument("--nats-url", default=None, help="default: $VIGIL_NATS_URL or nats://127.0.0.1:4222")
    p.add_argument("--bentoml-url", default=None, help="default: $VIGIL_BENTOML_URL or http://127.0.0.1:3000")
    p.set_defaults(func=_worker)

    p = subparsers.add_parser("serve-model", help="serve the model with BentoML (bentoml serve)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.set_defaults(func=_serve_model)
