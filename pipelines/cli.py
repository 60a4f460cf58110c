"""`twinv2 <stage>`: the public command line (flags are a contract: add freely, never rename).

Every subcommand calls the `run` function of its stage module in pipelines/, imported lazily so that
`twinv2 --help` stays fast. Every failure ends in one paragraph on stderr and the exit code of its class
(twinv2.errors, README "Exit codes"); TWINV2_DEBUG=1 adds the traceback."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from twinv2.errors import EXIT_USAGE, ConfigError

from pipelines.settings import MODELS, check_overrides, check_values, parse_overrides

EXIT_CODES = """exit codes: 0 success | 1 validation failed | 2 bad input data | 3 usage or configuration error |
4 unusable checkpoint/model file | 5 operating-system error (disk full, read-only output) | 70 internal error |
130 interrupted. Set TWINV2_DEBUG=1 to print tracebacks."""


class _Formatter(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)


class _Parser(argparse.ArgumentParser):
    """argparse with the usage exit code of twinv2 (3), not argparse's 2 (= bad input data here)."""

    def error(self, message: str):  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: usage error: {message} (see `{self.prog} --help`)\n")


def load_cli_params(path: str | None, pairs: list[str]) -> dict:
    """params.yaml (or --params FILE) with the --set overrides, every problem a ConfigError."""
    import yaml

    from twinv2.config import load_params

    source = path or "the repository's params.yaml"
    try:
        base = load_params(path)
    except FileNotFoundError as e:
        raise ConfigError(f"--params {path}: no such file ({e}).") from None
    except IsADirectoryError:
        raise ConfigError(f"--params {path}: is a directory; expected a params.yaml file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"--params {path}: not a YAML file ({' '.join(str(e).split())[:300]}); expected a "
                          f"params.yaml like the repository's") from None
    except OSError as e:
        raise ConfigError(f"--params {path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(base, dict) or not all(isinstance(k, str) for k in base):
        raise ConfigError(f"--params {source}: not a params file: expected a YAML mapping of sections "
                          f"(generate, validate, cluster, model, train, evaluate, ...), got "
                          f"{type(base).__name__} {str(base)[:60]!r}")
    ref = None
    if path:                                     # the sections the repository's params.yaml has
        ref = load_params()
        missing = [k for k, v in ref.items() if isinstance(v, dict) and not isinstance(base.get(k), dict)]
        if missing:
            raise ConfigError(f"--params {path}: lacks the sections {missing} (or they are not mappings); "
                              f"expected a complete params.yaml: copy the repository's and edit it")
    overrides = check_overrides(base, parse_overrides(pairs), source, reference=ref)
    return check_values(load_params(path, overrides), f"{source} with the --set overrides" if pairs else source)


def _common(p: argparse.ArgumentParser, sub: bool) -> None:
    g = p.add_argument_group("parameters (also accepted before the stage name)" if sub else "parameters")
    g.add_argument("--params", dest="params_sub" if sub else "params", default=None, metavar="FILE",
                   help="params.yaml to read (default: the repository's params.yaml)")
    g.add_argument("--set", dest="set_sub" if sub else "set", action="append", default=None if sub else [],
                   metavar="KEY=VALUE",
                   help="override one parameter of params.yaml, e.g. --set train.lr=0.01 (repeatable; the "
                        "value is YAML; default: none)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="twinv2", formatter_class=_Formatter, epilog=EXIT_CODES,
                description="TWIN-V2 life-cycle CTR modelling pipeline. Stages: generate | ingest -> validate -> "
                            "cluster -> train -> evaluate -> register; benchmark runs the experiment matrix. `twinv2 <stage> "
                            "--help` describes each.")
    _common(p, sub=False)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="<stage>", parser_class=_Parser)

    def stage(name: str, help: str, description: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help, description=description, epilog=EXIT_CODES, formatter_class=_Formatter)
        return s

    g = stage("generate", "write the synthetic life-cycle world",
              "Write the synthetic life-cycle world to OUT/raw (+ OUT/reports/generate.json).")
    g.add_argument("--preset", choices=["tiny", "default", "large"], default="default",
                   help="world size: tiny (tests), default (300 users, 742k behaviours) or large "
                        "(default: %(default)s)")
    g.add_argument("--out", required=True, metavar="DIR", help="dataset directory to write (required)")
    g.add_argument("--seed", type=int, default=None, metavar="N",
                   help="random seed (default: generate.seed of params.yaml)")

    i = stage("ingest", "map a public log into the canonical data model",
              "Map a public log (KuaiRand, MovieLens, Taobao) into OUT/raw; rejected lines go to "
              "OUT/quarantine/ with file, line and reason (docs/data.md).")
    i.add_argument("--format", dest="fmt", choices=["kuairand", "movielens", "taobao"], required=True,
                   help="the log's format (required)")
    i.add_argument("--src", required=True, metavar="PATH", help="the log's file or directory (required)")
    i.add_argument("--out", required=True, metavar="DIR", help="dataset directory to write (required)")

    v = stage("validate", "validate DIR/raw into DIR/validated + DIR/quarantine",
              "Validate DIR/raw (Great Expectations + vectorised rules, docs/validation.md) into DIR/validated, "
              "DIR/quarantine and DIR/reports/validation.json. Exit 1 when a table-level expectation fails.")
    v.add_argument("--data", required=True, metavar="DIR", help="dataset directory holding raw/ (required)")

    c = stage("cluster", "hierarchical clustering of every user's history",
              "Cluster every user's validated history into a new immutable version DIR/clusters/<version>/ "
              "and point DIR/clusters/CURRENT at it (docs/clustering.md).")
    c.add_argument("--data", required=True, metavar="DIR", help="dataset directory holding validated/ (required)")
    c.add_argument("--incremental", action="store_true",
                   help="update the CURRENT version with the behaviours after its watermark instead of "
                        "clustering from scratch (default: off)")
    c.add_argument("--shard", default=None, metavar="I/N",
                   help="only the users of shard I of N, e.g. 0/4; the shard completing the set publishes "
                        "the version (default: all users)")
    c.add_argument("--embeddings", default=None, metavar="RUN|NPZ|PT|MLFLOW_URI",
                   help="item embeddings of a trained model: a run directory, its item_embeddings.npz, its "
                        "model.pt or an epoch checkpoint, or an MLflow URI (default: bootstrap SVD of item "
                        "co-occurrence)")
    c.add_argument("--watermark", type=int, default=None, metavar="MS",
                   help="as-of time W in ms since the epoch (default: cluster.watermark of params.yaml, else "
                        "the data's history_end_ms; incremental: the current W + cluster.incremental_step_ms)")

    t = stage("train", "train one model",
              "Train one model on DIR/validated (and DIR/clusters/CURRENT for twinv2) into RUNDIR: epoch "
              "checkpoints, model.pt, item_embeddings.npz, config (docs/training.md).")
    t.add_argument("--data", required=True, metavar="DIR", help="dataset directory holding validated/ (required)")
    t.add_argument("--model", required=True, choices=MODELS, metavar="MODEL",
                   help="the model to train, one of: " + ", ".join(MODELS) + " (required; docs/models.md)")
    t.add_argument("--out", required=True, metavar="RUNDIR", help="run directory to write (required)")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in RUNDIR/checkpoints (default: off, start afresh)")
    t.add_argument("--warm-start", default=None, metavar="CHECKPOINT",
                   help="initialise the weights from this model.pt or epoch checkpoint (default: random init)")

    e = stage("evaluate", "offline AUC/GAUC/logloss/diversity of a trained run",
              "Evaluate a trained run on the test split of DIR/validated: AUC, GAUC, logloss, oracle gap, "
              "groups, diversity -> RUNDIR/metrics.json and RUNDIR/plots/.")
    e.add_argument("--data", required=True, metavar="DIR", help="dataset directory holding validated/ (required)")
    e.add_argument("--run", required=True, metavar="RUNDIR", help="a `twinv2 train` run directory (required)")

    r = stage("register", "register a run's model in MLflow (challenger/champion)",
              "Register a run's model in the MLflow registry as `challenger`, and `champion` when it beats the "
              "current champion's GAUC by register.champion_margin.")
    r.add_argument("--run", required=True, metavar="RUNDIR", help="an evaluated run directory (required)")
    r.add_argument("--data", default=None, metavar="DIR",
                   help="dataset directory, for the lineage tags (default: the one in the run's config)")
    b = stage("benchmark", "train and evaluate every (model, variant, seed) cell; the results tables",
              "Train and evaluate every cell (model, variant, seed) of the experiment matrix on DIR: the variants "
              "are named override sets of params.yaml `benchmark.variants` (the default variant always runs; the "
              "others run for benchmark.ablation_models), a variant changing `cluster` gets its own cluster "
              "version. Resumable and idempotent: a finished cell (OUT/cells/<model>/<variant>/seed<S>/cell.json) "
              "is not recomputed, a killed one resumes from its checkpoints. Writes OUT/results.json, "
              "OUT/results.md (main, ablations, user groups, diversity, cost) and OUT/plots/*.png.")
    b.add_argument("--data", default=None, metavar="DIR",
                   help="dataset directory holding validated/ (required unless --rerender; clusters are built as "
                        "needed)")
    b.add_argument("--out", required=True, metavar="OUT", help="benchmark directory to write (required)")
    b.add_argument("--models", default=None, metavar="M1,M2",
                   help="comma-separated models, some of: " + ", ".join(MODELS) +
                        " (default: benchmark.models of params.yaml)")
    b.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="number of training seeds, train.seed = 0..N-1 (default: benchmark.seeds of params.yaml)")
    b.add_argument("--variants", default=None, metavar="V1,V2",
                   help="comma-separated variant names of params.yaml benchmark.variants (default: "
                        "benchmark.run_variants, else every variant; `default` is always included)")
    b.add_argument("--cell", action="append", default=None, metavar="MODEL/VARIANT/SEED",
                   help="run only this cell of the plan, e.g. twinv2/gamma5/0, and write no report (repeatable; "
                        "what the DVC cell stages run; default: every cell, then the report)")
    b.add_argument("--publish", default=None, metavar="DOC",
                   help="also put results.md into DOC (e.g. docs/results.md) between its generated-report markers, "
                        "replacing the previous report (default: off)")
    b.add_argument("--adopt", default=None, metavar="RESULTS_JSON",
                   help="take the cells of an earlier report (its results.json, e.g. docs/results_files/results.json) "
                        "whose key (model, params, cluster version over the same data) equals a planned cell's as done, "
                        "so that a report grows by new cells without recomputing the published ones (default: off)")
    b.add_argument("--rerender", default=None, metavar="RESULTS_JSON",
                   help="write the report (and --publish it) from the stored cells of an earlier results.json with "
                        "today's report code, computing nothing and reading no data (no --data needed; pass the "
                        "same --set as the original command) (default: off)")
    for s in (g, i, v, c, t, e, r, b):
        _common(s, sub=True)
    return p


def _dispatch(args: argparse.Namespace, params: dict) -> Any:
    if args.cmd == "generate":
        from pipelines import generate
        return generate.run(preset=args.preset, out=args.out, seed=args.seed, params=params)
    if args.cmd == "ingest":
        from pipelines import ingest
        return ingest.run(fmt=args.fmt, src=args.src, out=args.out, params=params)
    if args.cmd == "validate":
        from pipelines import validate
        return validate.run(data=args.data, params=params)
    if args.cmd == "cluster":
        from pipelines import cluster
        return cluster.run(data=args.data, incremental=args.incremental, shard=args.shard,
                           params=params, embeddings=args.embeddings, watermark=args.watermark)
    if args.cmd == "train":
        from pipelines import train
        return train.run(data=args.data, model=args.model, out=args.out, params=params,
                         resume=args.resume, warm_start=args.warm_start)
    if args.cmd == "evaluate":
        from pipelines import evaluate
        return evaluate.run(data=args.data, run=args.run, params=params)
    if args.cmd == "benchmark":
        from pipelines import benchmark
        command = "twinv2 " + benchmark.shown_command(getattr(args, "argv", None) or sys.argv[1:])
        if args.rerender:
            return benchmark.rerender(args.rerender, args.out, params, command=command, publish_to=args.publish)
        if not args.data:
            raise ConfigError("twinv2 benchmark: --data DIR is required (unless --rerender RESULTS_JSON)")
        return benchmark.run(data=args.data, out=args.out, params=params, models=args.models, seeds=args.seeds,
                             variants=args.variants, command=command,
                             only=args.cell, publish_to=args.publish, adopt_from=args.adopt)
    if args.cmd == "register":
        from pipelines import register
        return register.run(run=args.run, data=args.data, params=params)
    raise SystemExit(EXIT_USAGE)  # pragma: no cover - argparse refuses unknown commands


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    from twinv2.errors import describe, format_traceback

    try:
        params = load_cli_params(args.params_sub or args.params, list(args.set) + list(args.set_sub or []))
        out = _dispatch(args, params)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - every failure gets its class's exit code
        paths = " ".join(f"--{k} {getattr(args, k)}" for k in ("data", "out", "run", "src")
                         if getattr(args, k, None))
        code, label, message = describe(exc, paths or None)
        if os.environ.get("TWINV2_DEBUG", "").strip() not in ("", "0", "false", "no"):
            print(format_traceback(exc), file=sys.stderr, end="")
        sep = "." if label == "FAILED" else ":"
        print(f"twinv2 {args.cmd}: {label}{sep} {message}", file=sys.stderr)
        return code
    if isinstance(out, dict):
        summary = out.get("summary")
        print(summary if isinstance(summary, str) else json.dumps(out, indent=2, default=str)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
