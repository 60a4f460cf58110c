"""Progress bars in Airflow task logs (issue 32, item 13): Airflow 3 logs a task's stderr at ERROR level, so a
stage run by a DAG task writes its tqdm bars to stdout (INFO); outside a stage stderr is untouched."""
from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "dags"))
import twinv2_common as common  # noqa: E402


def _stage(**kwargs):
    for _ in tqdm(range(3), desc="epoch 1/1"):
        pass
    return {"ok": True}


def test_stage_progress_goes_to_stdout_in_a_task(capsys, monkeypatch):
    from pipelines import tracking

    monkeypatch.setattr(tracking, "run_stage", lambda ctx, parent, name, fn, **kw: fn(**kw.get("kwargs", {})))
    assert common.run_stage({}, None, "train", _stage, kwargs={}) == {"ok": True}
    out, err = capsys.readouterr()
    assert "epoch 1/1" in out and "epoch 1/1" not in err, (out, err)
    with common.stdout_progress():
        print("inside", file=sys.stderr)
    print("outside", file=sys.stderr)
    out, err = capsys.readouterr()
    assert "inside" in out and err == "outside\n"


def test_every_stage_of_the_dags_runs_through_it():
    dags = Path(common.__file__).parent
    for f in ("twinv2_daily.py", "twinv2_recluster.py", "twinv2_benchmark.py"):
        assert "tracking.run_stage(" not in (dags / f).read_text(), f
    assert (dags / "twinv2_common.py").read_text().count("        return tracking.run_stage(") == 1  # the wrapper
    assert (dags / "twinv2_common.py").read_text().count("tracking.run_stage(") == 1        # nothing else
    assert "with common.stdout_progress():" in (dags / "twinv2_benchmark.py").read_text()
