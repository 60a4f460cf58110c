"""bench/bench_cluster.py --check fails on a missed target (the check itself is tested, not the timings)."""
from bench.bench_cluster import targets


def _res(speedup=12.0, inertia=1.01, incr=25.0, incr_inertia=0.99, rss=1500.0):
    return {"speedup": [{"n": 10_000, "speedup": speedup, "inertia_ratio": inertia}],
            "incremental": [{"n": 100_000, "users": 10, "speedup": incr, "inertia_ratio": incr_inertia}],
            "throughput": [{"n": 1_000_000, "peak_rss_mib": rss}]}


def _failed(res):
    return sorted(t["name"].split(" n=")[0] for t in targets(res) if t["applies"] and not t["ok"])


def test_all_targets_pass_on_good_figures():
    assert _failed(_res()) == []


def test_each_missed_target_is_reported():
    assert _failed(_res(speedup=9.9)) == ["fast/reference speedup"]
    assert _failed(_res(inertia=1.06)) == ["inertia fast/reference"]
    assert _failed(_res(incr=19.0)) == ["incremental speedup"]
    assert _failed(_res(incr_inertia=0.94)) == ["inertia incremental/full"]
    assert _failed(_res(rss=2100.0)) == ["peak RSS MiB"]


def test_quick_sizes_are_informative_only():
    res = _res(speedup=5.0)
    res["speedup"][0]["n"] = 30_000
    assert _failed(res) == []
