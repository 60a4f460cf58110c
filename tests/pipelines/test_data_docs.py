"""GX Data Docs: built on each validation (passed or failed) into DIR/reports/data_docs, linked from
reports/validation.json, and logged to MLflow by the stage run the validate task makes; readable with no
network (no CDN scripts, stylesheets or images, no dead links, tables as plain HTML, checked in headless
Chromium with the network off), every validation page naming its table and batch."""
from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from twinv2.errors import ValidationFailed


TABLES = ("items", "behaviors", "impressions")


def _pages(data):
    return sorted(p.relative_to(data / "reports" / "data_docs").as_posix()
                  for p in (data / "reports" / "data_docs").rglob("*.html"))


def test_data_docs_built_linked_and_logged(tiny_world, params, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from pipelines import tracking, validate

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    ctx = {"dag_id": "test", "run_id": "docs", "try_number": 1, "map_index": -1}
    parent = tracking.parent_run(ctx, data=tiny_world)
    reports = tiny_world / "reports"
    rep = tracking.run_stage(ctx, parent, "validate", validate.run, data=tiny_world, params=params,
                             artifacts=[reports / "validation.json", reports / "data_docs"],
                             kwargs={"data": tiny_world, "params": params})       # what the DAG's validate does
    assert rep["data_docs"] == "data_docs/index.html"
    assert json.loads((reports / "validation.json").read_text())["data_docs"] == "data_docs/index.html"
    pages = _pages(tiny_world)
    assert "index.html" in pages
    for table in ("items", "behaviors", "impressions"):
        assert any(p.startswith(f"validations/twinv2_{table}/") for p in pages), pages
    index = (reports / "data_docs" / "index.html").read_text()
    assert "twinv2_impressions" in index
    c = MlflowClient(tracking_uri=uri)
    files = {a.path for a in c.list_artifacts(rep["mlflow_run_id"], "data_docs")}
    assert "data_docs/index.html" in files, files
    assert c.get_run(rep["mlflow_run_id"]).data.params["validate.gx_confirm"] == "True"   # its stage params


@pytest.fixture(scope="module")
def failed_docs(tiny_world_ro, params, tmp_path_factory):
    """The tiny world with every play_ms negative (behaviours fail) validated in batches of 8000 behaviour
    rows (several behaviour batches): (the world, the ValidationFailed it raised)."""
    from pipelines import validate

    world = tmp_path_factory.mktemp("docs_failed") / "world"
    shutil.copytree(tiny_world_ro, world)
    for part in sorted((world / "raw" / "behaviors").glob("part-*.parquet")):
        t = pq.read_table(part)
        neg = pc.subtract(pc.multiply(pc.cast(t["play_ms"], pa.int32()), pa.scalar(-1, pa.int32())),
                          pa.scalar(1, pa.int32()))
        pq.write_table(t.set_column(t.schema.get_field_index("play_ms"), "play_ms", neg), part)
    p = copy.deepcopy(params)
    p["validate"]["batch_rows"] = 8000
    with pytest.raises(ValidationFailed) as err:
        validate.run(data=world, params=p)
    return world, err.value


def test_data_docs_of_a_failed_validation(failed_docs):
    world, err = failed_docs
    assert err.report.get("data_docs") == "data_docs/index.html"
    assert json.loads((world / "reports" / "validation.json").read_text())["success"] is False
    html = "".join(p.read_text() for p in (world / "reports" / "data_docs" / "validations").rglob("*.html"))
    assert "Failed" in html or "failed" in html


class _Page(HTMLParser):
    """A page's href/src attributes (tag, attribute, value) and its text outside <script> and <style>."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.refs: list[tuple[str, str, str]] = []
        self.words: list[str] = []
        self._hidden = 0
        self.feed(text)
        self.text = " ".join(" ".join(self.words).split())

    def handle_starttag(self, tag, attrs):
        self.refs += [(tag, k, v) for k, v in attrs if k in ("href", "src") and v is not None]
        self._hidden += tag in ("script", "style")

    def handle_endtag(self, tag):
        self._hidden -= tag in ("script", "style")

    def handle_data(self, data):
        if not self._hidden:
            self.words.append(data)


@pytest.fixture(scope="module")
def sites(tiny_validated_ro, failed_docs):
    """The Data Docs of a passed and of a failed validation."""
    return {"passed": tiny_validated_ro / "reports" / "data_docs",
            "failed": failed_docs[0] / "reports" / "data_docs"}


def _all_pages(sites):
    for name, site in sites.items():
        pages = sorted(site.rglob("*.html"))
        assert len(pages) >= 4, (name, pages)
        for page in pages:
            yield f"{name}: {page.relative_to(site)}", page, page.read_text(encoding="utf-8")


def test_data_docs_load_nothing_from_the_network(sites):
    for where, _, raw in _all_pages(sites):
        assert not re.search(r"url\(\s*['\"]?(https?:)?//", raw), where
        for tag, attr, value in _Page(raw).refs:       # no CDN script/stylesheet/image, and no web links either
            assert not re.match(r"(https?:)?//", value, re.I), f"{where}: <{tag} {attr}={value!r}>"


def test_data_docs_have_no_dead_links(sites):
    for where, page, raw in _all_pages(sites):
        for tag, attr, value in _Page(raw).refs:
            if value.startswith("#") or re.match(r"([a-z][\w+.-]*:|//)", value, re.I):
                continue
            target = page.parent / value.split("#")[0].split("?")[0]
            assert target.is_file(), f"{where}: <{tag} {attr}={value!r}> points at no file"


def test_data_docs_pages_name_their_table_and_batch(sites):
    for name, site in sites.items():
        index = _Page((site / "index.html").read_text(encoding="utf-8"))
        for table in TABLES:
            pages = sorted((site / "validations" / f"twinv2_{table}").rglob("*.html"))
            assert pages, (name, table)
            for page in pages:
                text = _Page(page.read_text(encoding="utf-8")).text
                assert "Data asset: None" not in text
                assert f"Data asset: {table}" in text, (name, page)
                batch = page.stem                                         # <table>-batch-<i>
                assert re.fullmatch(rf"{table}-batch-\d+", batch), page
                assert f"-batch-{batch.rsplit('-', 1)[1]} /" in text, (name, page)   # the title's run name
                assert batch in index.text, (name, batch)               # the index lists it without JS
                link = page.relative_to(site).as_posix()
                assert ("a", "href", link) in index.refs, (name, link)  # and links its page
            assert (site / "expectations" / f"twinv2_{table}.html").is_file(), (name, table)   # the suite's
    behaviors = sorted((sites["failed"] / "validations" / "twinv2_behaviors").rglob("*.html"))
    assert len(behaviors) >= 2, behaviors                                  # batches of 8000 rows


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed: `apt-get install -y chromium` (.ci/run does it)")
    return exe


OFFLINE_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",   # no network
                 "--virtual-time-budget=5000"]


def _rendered_text(exe: str, page: Path) -> str:
    with tempfile.TemporaryDirectory() as prof:
        out = subprocess.run([exe, *OFFLINE_FLAGS, f"--user-data-dir={prof}", "--dump-dom", page.as_uri()],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "</html>" in out.stdout, out.stderr[-2000:]
    return _Page(out.stdout).text


def test_data_docs_render_offline_in_chromium(sites):
    exe = _chromium()
    site = sites["failed"]
    index = _rendered_text(exe, site / "index.html")
    for table in TABLES:
        assert f"twinv2_{table}" in index and f"{table}-batch-0" in index, index[:3000]
    assert "Failed" in index and "Success" in index, index[:3000]          # the status column, as text
    page = sorted((site / "validations" / "twinv2_behaviors").rglob("behaviors-batch-0.html"))[0]
    text = _rendered_text(exe, page)
    for expected in ("Data asset: behaviors", "Status: Failed",
                     "Evaluated Expectations", "Successful Expectations", "Unsuccessful Expectations",
                     "values must be greater than or equal to", "values must never be null", "unexpected",
                     "play_ms", "duration_ms"):
        assert expected in text, (expected, text[:3000])
    stats = re.search(r"Evaluated Expectations (\d+) Successful Expectations (\d+) "
                      r"Unsuccessful Expectations (\d+)", text)
    assert stats and int(stats[3]) >= 1 and int(stats[1]) == int(stats[2]) + int(stats[3]), text[:3000]
