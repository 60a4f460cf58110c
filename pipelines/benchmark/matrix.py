"""The whole matrix: every cell of the plan, then the report (the CLI `twinv2 benchmark`); the report of cells
already computed (the DAG's report task)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable

from twinv2.config import load_params
from twinv2.errors import ConfigError
from twinv2.io import read_json, write_json

from pipelines.benchmark.cells import adopt, is_done, run_cell
from pipelines.benchmark.planning import (cell_dir, clusters_of, digest, label, plan, prepare, select,
                                          settings, shown_path)
from pipelines.benchmark.reporting import publish, report


def bench_id(out: str | Path) -> str:
    p = Path(out).resolve()
    return f"{p.name}-{digest(str(p), 8)}"


def run(data: str | Path, out: str | Path, params: dict | None = None, models=None, seeds=None, variants=None,
        command: str | None = None, only: Iterable[str] | None = None, publish_to: str | Path | None = None,
        adopt_from: str | Path | None = None) -> dict:
    """Every cell of the plan, then the report; `only` (MODEL/VARIANT/SEED names): just those cells, no
    report (what the DVC cell stages run; the report stage runs the whole plan, computing nothing new).
    `adopt_from`: an earlier results.json whose cells with the same key are taken as done (`adopt`)."""
    params = params or load_params()
    st = settings(params)
    data, out = Path(data), Path(out)
    planned = plan(params, models, seeds, variants)
    if only:
        planned = select(planned, only)
    out.mkdir(parents=True, exist_ok=True)
    cells = prepare(data, params, planned)
    adopted = adopt(out, cells, adopt_from) if adopt_from else None
    if only:
        recs = [run_cell(data, out, c) for c in cells]
        n = sum(1 for r in recs if not r.get("skipped"))
        return {"cells": len(cells), "computed": n, "skipped": len(cells) - n,
                "summary": f"benchmark: cells {', '.join(label(c) for c in cells)} ({n} computed) -> {out / 'cells'}"}
    write_json(out / "plan.json", [{k: c[k] for k in ("label", "model", "variant", "seed", "key", "cluster_version",
                                                      "overrides")} for c in cells])
    track = None
    from pipelines import tracking

    if tracking.tracking_wanted():
        ctx = {"dag_id": "twinv2_benchmark_cli", "run_id": bench_id(out), "try_number": 1, "map_index": -1}
        parent = tracking.parent_run(ctx, data=data, params={k: v for k, v in params.items()})
        track = (ctx, parent)
    t0 = time.perf_counter()
    records = []
    for c in cells:
        records.append(run_cell(data, out, c, track))
    computed = sum(1 for r in records if not r.get("skipped"))
    meta = build_meta(data, cells, command or "twinv2 benchmark", wall_s=time.perf_counter() - t0,
                      computed=computed, skipped=len(records) - computed,
                      **({"adopted": adopted} if adopted else {}))
    rep = report(out, [read_json(cell_dir(out, c) / "cell.json") for c in cells], st, meta,
                 clusters_of(data, cells))
    if publish_to:
        publish(out / "results.md", publish_to)
    if track is not None:
        c = tracking.client()
        tracking.log_paths(c, track[1], [out / "results.json", out / "results.md", out / "plots"], "benchmark")
        tracking.finish(c, track[1], ok=True)
    summary = (f"benchmark: {len(cells)} cells ({computed} computed, {len(records) - computed} already done) -> "
               f"{out / 'results.md'}")
    return {"cells": len(cells), "computed": computed, "skipped": len(records) - computed,
            "results": str(out / "results.json"), "markdown": str(out / "results.md"), "summary": summary}


def build_meta(data, cells: list[dict], command: str, **extra) -> dict:
    from pipelines import tracking

    return {"command": command, "git_commit": tracking.git_commit(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "data": str(Path(data)),
            "models": list(dict.fromkeys(c["model"] for c in cells)),
            "variants": list(dict.fromkeys(c["variant"] for c in cells)),
            "seeds": sorted({int(c["seed"]) for c in cells}), "n_cells": len(cells), **extra}


def report_from_dir(data, out: str | Path, cells: list[dict], params: dict, command: str, **extra) -> dict:
    """The report of cells already computed (the DAG's report task): every cell must be done."""
    st = settings(params)
    missing = [label(c) for c in cells if not is_done(out, c)]
    if missing:
        raise RuntimeError(f"{out}: cells not done: {missing}; run them first")
    records = [read_json(cell_dir(out, c) / "cell.json") for c in cells]
    meta = build_meta(data, cells, command, **extra)
    return report(out, records, st, meta, clusters_of(data, cells))


def rerender(results: str | Path, out: str | Path, params: dict | None = None, command: str | None = None,
             publish_to: str | Path | None = None) -> dict:
    """The report of an earlier results.json, rendered again from its stored cells by today's report code:
    nothing is computed and no data is read (its cells, figures and cluster table are those stored; the columns
    are today's, e.g. the valid metrics read from each cell's curve). The variants' overrides come from params
    (pass the same --set as the original command)."""
    results = Path(results)
    try:
        old = read_json(results)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--rerender {results}: cannot read it as a benchmark results.json ({e})") from e
    if not isinstance(old, dict) or not isinstance(old.get("cells"), list) or not isinstance(old.get("meta"), dict):
        raise ConfigError(f"--rerender {results}: no `cells` list and `meta`; expected the results.json of "
                          f"`twinv2 benchmark`")
    params = params or load_params()
    st = settings(params)
    records = old["cells"]
    keep = ("data", "models", "variants", "seeds", "n_cells", "adopted")
    meta = {**{k: old["meta"][k] for k in keep if k in old["meta"]},
            **build_meta(old["meta"].get("data", "?"), [], command or "twinv2 benchmark --rerender"),
            **{k: old["meta"][k] for k in ("models", "variants", "seeds", "n_cells") if k in old["meta"]},
            "rerendered_from": {"from": shown_path(str(results)), "commit": old["meta"].get("git_commit"),
                                "command": old["meta"].get("command")}}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rep = report(out, records, st, meta, old.get("clusters") or [])
    if publish_to:
        publish(out / "results.md", publish_to)
    return {"cells": len(records), "computed": 0, "results": str(out / "results.json"),
            "markdown": str(out / "results.md"), "tables": rep["tables"],
            "summary": f"benchmark: the report of {len(records)} stored cells of {results} rendered again -> "
                       f"{out / 'results.md'}"}
