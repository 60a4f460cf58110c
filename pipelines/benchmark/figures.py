"""The report's plots (OUT/plots/*.png): main, ablations, user groups, training curves, gamma."""
from __future__ import annotations

from pathlib import Path

from twinv2.io import atomic_path

from pipelines.benchmark.stats import mean_std


def plots(out: Path, t: dict, st: dict) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:                          # pragma: no cover - matplotlib is a dependency
        return []
    folder = out / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        with atomic_path(folder / name) as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(str(folder / name))

    def bars(rows, keyname, title, fname):
        fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(rows) + 2), 3.5))
        xs = list(range(len(rows)))
        for j, (k, off) in enumerate((("auc", -0.2), ("gauc", 0.2))):
            m = [r[k][0] or 0 for r in rows]
            e = [r[k][1] or 0 for r in rows]
            ax.bar([x + off for x in xs], m, 0.4, yerr=e, capsize=3, label=k.upper())
        ax.set_xticks(xs, [r[keyname] for r in rows], rotation=30, ha="right", fontsize=8)
        lo = min([r[k][0] for r in rows for k in ("auc", "gauc") if r[k][0] is not None] or [0.5])
        ax.set(ylim=(max(0.0, lo - 0.05), None), title=title)
        ax.legend(fontsize=8)
        save(fig, fname)

    if t["main"]:
        bars(t["main"], "model", "AUC / GAUC per model (mean +- std over seeds)", "main.png")
    if t["ablation"]:
        bars(t["ablation"], "variant", "Ablations: AUC / GAUC per variant", "ablations.png")
    if t["groups"]:
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for m in dict.fromkeys(r["model"] for r in t["groups"]):
            rows = [r for r in t["groups"] if r["model"] == m]
            ax.errorbar([r["group"] for r in rows], [r["gauc"][0] if r["gauc"][0] is not None else float("nan")
                                                     for r in rows],
                        yerr=[r["gauc"][1] or 0 for r in rows], marker="o", capsize=3, label=m)
        ax.set(xlabel="life-cycle length group (short -> long)", ylabel="GAUC", title="GAUC vs history length")
        ax.legend(fontsize=7)
        save(fig, "groups.png")
    return written


def more_plots(out: Path, records: list[dict], st: dict, clusters: list[dict]) -> list[str]:
    """Training curves (valid GAUC per epoch of every default-variant cell) and, when gamma variants ran,
    compression and AUC vs gamma."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = out / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        with atomic_path(folder / name) as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(str(folder / name))

    default = [r for r in records if r["variant"] == st["default"] and r.get("curve")]
    if default:
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        colours = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r["model"] for r in default))}
        for r in default:
            ep = [h["epoch"] for h in r["curve"]]
            ax.plot(ep, [h["valid_gauc"] for h in r["curve"]], "o-", color=colours[r["model"]], alpha=0.8,
                    label=r["model"] if r["seed"] == min(x["seed"] for x in default if x["model"] == r["model"]) else None)
        ax.set(xlabel="epoch", ylabel="valid GAUC", title="training curves (every seed)")
        ax.legend(fontsize=7)
        save(fig, "curves.png")
    # gamma: the default variant and the variants that change cluster.gamma only
    by_gamma: dict[float, dict] = {}
    comp = {c["version"]: c.get("compression") for c in clusters}
    for r in records:
        if r["model"] not in st["ablation_models"] or set(r.get("overrides") or {}) - {"cluster.gamma"}:
            continue
        g = (r.get("cluster_params") or {}).get("gamma")
        if g is None:
            continue
        e = by_gamma.setdefault(float(g), {"auc": [], "compression": comp.get(r.get("cluster_version"))})
        e["auc"].append(r["metrics"].get("auc"))
    if len(by_gamma) >= 2:
        gs = sorted(by_gamma)
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        ax.plot(gs, [by_gamma[g]["compression"] or float("nan") for g in gs], "s-", color="C1", label="compression")
        ax.set(xlabel="gamma (max cluster size)", ylabel="behaviours per cluster", xscale="log")
        ax2 = ax.twinx()
        ms = [mean_std(by_gamma[g]["auc"]) for g in gs]
        ax2.errorbar(gs, [m[0] if m[0] is not None else float("nan") for m in ms], yerr=[m[1] or 0 for m in ms],
                     marker="o", color="C0", capsize=3, label="AUC")
        ax2.set(ylabel="test AUC")
        ax.set_title("compression and AUC vs gamma")
        fig.legend(fontsize=7, loc="upper left")
        save(fig, "gamma.png")
    return written
