"""`twinv2 <stage>`: the public command line (flags are a contract: add freely, never rename).

Every subcommand calls the `run` function of its stage module in pipelines/, imported lazily so that
`twinv2 --help` stays fast."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _overrides(pairs: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"--set expects key=value (for example train.lr=0.01), got {pair!r}")
        k, v = pair.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="twinv2", description="TWIN-V2 life-cycle CTR modelling pipeline")
    p.add_argument("--params", default=None, help="params.yaml to use (default: the repository's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one parameter, e.g. --set train.lr=0.01 (repeatable)")
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="write the synthetic life-cycle world")
    g.add_argument("--preset", choices=["tiny", "default", "large"], default="default")
    g.add_argument("--out", required=True)
    g.add_argument("--seed", type=int, default=None)

    i = sub.add_parser("ingest", help="map a public log into the canonical data model")
    i.add_argument("--format", dest="fmt", choices=["kuairand", "movielens", "taobao"], required=True)
    i.add_argument("--src", required=True)
    i.add_argument("--out", required=True)

    v = sub.add_parser("validate", help="validate DIR/raw into DIR/validated + DIR/quarantine")
    v.add_argument("--data", required=True)

    c = sub.add_parser("cluster", help="hierarchical clustering of every user's history")
    c.add_argument("--data", required=True)
    c.add_argument("--incremental", action="store_true")
    c.add_argument("--shard", default=None, help="I/N: only the users of shard I of N")
    c.add_argument("--embeddings", default=None,
                   help="checkpoint path or MLflow model URI of a trained model (default: bootstrap SVD)")
    c.add_argument("--watermark", type=int, default=None, help="as-of time W in ms (default: params)")

    t = sub.add_parser("train", help="train one model")
    t.add_argument("--data", required=True)
    t.add_argument("--model", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--warm-start", default=None, help="checkpoint to initialise from")

    e = sub.add_parser("evaluate", help="offline AUC/GAUC/logloss/diversity of a trained run")
    e.add_argument("--data", required=True)
    e.add_argument("--run", required=True)

    r = sub.add_parser("register", help="register a run's model in MLflow (challenger/champion)")
    r.add_argument("--run", required=True)
    r.add_argument("--data", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from twinv2.config import load_params
    from twinv2.errors import TwinV2Error, ValidationFailed

    params = load_params(args.params, _overrides(args.set))
    try:
        if args.cmd == "generate":
            from pipelines import generate
            out = generate.run(preset=args.preset, out=args.out, seed=args.seed, params=params)
        elif args.cmd == "ingest":
            from pipelines import ingest
            out = ingest.run(fmt=args.fmt, src=args.src, out=args.out, params=params)
        elif args.cmd == "validate":
            from pipelines import validate
            out = validate.run(data=args.data, params=params)
        elif args.cmd == "cluster":
            from pipelines import cluster
            out = cluster.run(data=args.data, incremental=args.incremental, shard=args.shard,
                              params=params, embeddings=args.embeddings, watermark=args.watermark)
        elif args.cmd == "train":
            from pipelines import train
            out = train.run(data=args.data, model=args.model, out=args.out, params=params,
                            resume=args.resume, warm_start=args.warm_start)
        elif args.cmd == "evaluate":
            from pipelines import evaluate
            out = evaluate.run(data=args.data, run=args.run, params=params)
        elif args.cmd == "register":
            from pipelines import register
            out = register.run(run=args.run, data=args.data, params=params)
        else:  # pragma: no cover - argparse refuses unknown commands
            raise SystemExit(2)
    except ValidationFailed as e:
        print(f"twinv2 {args.cmd}: FAILED. {e}", file=sys.stderr)
        return 1
    except (TwinV2Error, FileNotFoundError, ValueError) as e:
        print(f"twinv2 {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    if isinstance(out, dict):
        summary = out.get("summary")
        print(summary if isinstance(summary, str) else json.dumps(out, indent=2, default=str)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
