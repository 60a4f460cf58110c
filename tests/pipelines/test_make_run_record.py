"""README's `make run` figures are the committed record `make run` writes (issue 30 item 3):
docs/results_files/make_run.md holds the table of the last default-world run, README quotes the same table."""
from __future__ import annotations

import json

from pipelines import main_job
from twinv2.config import REPO_ROOT


def test_readme_quotes_the_committed_make_run_record():
    record = main_job.RECORD.read_text()
    readme = (REPO_ROOT / "README.md").read_text()
    assert "docs/results_files/make_run.md" in readme
    assert main_job.table_block(readme) == main_job.table_block(record), (
        "README's make-run table differs from docs/results_files/make_run.md: copy the record's table")


def _run(root, model, auc, gauc):
    d = root / model
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({
        "model": model, "auc": auc, "gauc": gauc, "logloss": 0.5, "oracle_auc": 0.78, "oracle_gap": 0.78 - auc,
        "diversity": {"retrieval": {"distinct_categories": 8.0}, "ranking": {"coverage": 0.4, "ild": 0.7}}}))


def test_the_run_writes_its_table_to_the_run_and_to_the_record(tmp_path, monkeypatch):
    monkeypatch.setattr(main_job, "RECORD", tmp_path / "docs" / "make_run.md")
    _run(tmp_path / "run", "twinv2", 0.6889, 0.6783)
    _run(tmp_path / "run", "twin", 0.6843, 0.6697)
    out = main_job.write_record(tmp_path / "run", ["twinv2", "twin"], "manual__x", 262.0, committed=True)
    assert out == [tmp_path / "run" / "make_run.md", main_job.RECORD]
    text = main_job.RECORD.read_text()
    assert text == out[0].read_text() and "262 s" in text and "manual__x" in text
    rows = {ln.split()[0]: ln.split()[1:3] for ln in main_job.table_block(text).splitlines()[2:]}
    assert rows == {"twinv2": ["0.6889", "0.6783"], "twin": ["0.6843", "0.6697"]}
    assert "oracle AUC (the world's p_true on the test split): 0.7800" in text
    # a run with --set or another --data leaves the committed record alone
    main_job.RECORD.unlink()
    assert main_job.write_record(tmp_path / "run", ["twinv2", "twin"], "y", 1.0, committed=False) == \
        [tmp_path / "run" / "make_run.md"]
    assert not main_job.RECORD.exists()
