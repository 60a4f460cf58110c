"""Great Expectations Data Docs of a validation: the HTML site GX renders from the validation results of every
table batch (reports/gx/validation_results.json, written by `twinv2 validate`), built into
DIR/reports/data_docs/ (index.html, one page per table batch, one per expectation suite) after each
validation, passed or failed, and made readable with no network (`offline`: no CDN scripts, stylesheets or
images, the index's tables as plain HTML, no dead links). Each validation page names its table (GX's
"Data asset") and batch (the run name `<DIR name>-batch-<i>` in its title, `batch` in its Batch Spec).
The validation report links it (`data_docs` in reports/validation.json); the Airflow validate task logs the
folder to its MLflow run (artifact `data_docs/`, open index.html in the MLflow UI's artifact view).
"""
from __future__ import annotations

import ast
import html
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import twinv2.validation  # noqa: F401  (quiets GX's import-time INFO lines before GX is imported here)

SITE = "data_docs"
OFFLINE = Path(__file__).with_name("data_docs_static")     # our CSS/JS, copied to data_docs/static/offline/

_SCRIPT = re.compile(r"<script\b[^>]*>.*?</script>\s*", re.S | re.I)
_EXT_LINK = re.compile(r"<link\b[^>]*\bhref=[\"']https?://[^>]*>\s*", re.I)
_EXT_IMG = re.compile(r"<img\b([^>]*?)\bsrc=[\"']https?://[^\"']*/([\w.-]+)(?:\?[^\"']*)?[\"']([^>]*)>", re.S | re.I)
_EXT_URL = re.compile(r"url\(['\"]?https?://[^)'\"]*/([\w.-]+)(?:\?[^)'\"]*)?['\"]?\)", re.I)
_EXT_HREF = re.compile(r"(<a\b[^>]*?)\s+href=[\"']https?://[^\"']*[\"']", re.I)
_REL_REF = re.compile(r"\s(?:href|src)=\"(?![a-z][\w+.-]*:|#)([^\"]*)\"", re.I)
_NEWSLETTER = re.compile(r"<footer>\s*<p>Stay current.*?</footer>\s*", re.S)
_BS_TABLE = re.compile(r"\$\('#(?P<id>[\w-]+)'\)\.bootstrapTable\(\s*Object\.assign\(\s*\{\s*"
                       r"columns:\s*(?P<columns>\[.*?\]),\s*data:\s*(?P<data>\[.*?\]),\s*toolbar:", re.S)


def build(data: str | Path) -> Path | None:
    """Build the Data Docs site of DIR's last validation; returns its index.html (None without GX results)."""
    reports = Path(data) / "reports"
    results = reports / "gx" / "validation_results.json"
    if not results.exists():
        return None
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.core.expectation_validation_result import ExpectationSuiteValidationResultSchema
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (ExpectationSuiteIdentifier,
                                                                           ValidationResultIdentifier)

    tables: dict[str, Any] = json.loads(results.read_text())
    final = reports / SITE
    tmp = reports / f".{SITE}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    context = gx.get_context(mode="ephemeral")
    context.add_data_docs_site(site_name="twinv2", site_config={
        "class_name": "SiteBuilder", "show_how_to_buttons": False,      # no tutorial footer, no walkthrough modal
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(tmp.resolve())}})
    run_time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(results.stat().st_mtime))
    schema = ExpectationSuiteValidationResultSchema()
    suites: dict[str, dict] = {}
    for table, entry in tables.items():
        batches = entry.get("batches") or []
        for i, js in enumerate(batches):
            suite = js.get("suite_name", f"twinv2_{table}")
            run_name = f"{Path(data).resolve().name}-batch-{i}"
            key = ValidationResultIdentifier(
                expectation_suite_identifier=ExpectationSuiteIdentifier(name=suite),
                run_id=RunIdentifier(run_name=run_name, run_time=run_time), batch_identifier=f"{table}-batch-{i}")
            result = schema.load(_named(js, table, i, len(batches), run_name, run_time))
            context.validation_results_store.set(key, result)
            suites.setdefault(suite, js)
    for name, js in suites.items():         # the suite pages the index links (expectations/<suite>.html)
        context.suites.add(_suite(gx, name, js))
    context.build_data_docs(site_names=["twinv2"])
    if not (tmp / "index.html").exists():
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    offline(tmp)
    old = reports / f".{SITE}.{os.getpid()}.old"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final / "index.html"


def _named(js: dict, table: str, i: int, n: int, run_name: str, run_time: str) -> dict:
    """The result with its table and batch named where GX's pages read them (the header's "Data asset",
    the title's run name, "Batch Spec"); GX's checkpoint leaves batch_spec without data_asset_name."""
    meta = dict(js.get("meta") or {})
    meta["batch_spec"] = {**(meta.get("batch_spec") or {}), "data_asset_name": table,
                          "batch": f"{table}-batch-{i} ({i + 1} of {n})"}
    meta["run_id"] = {"run_name": run_name, "run_time": run_time}
    return {**js, "meta": meta}


def _suite(gx: Any, name: str, js: dict) -> Any:
    """The expectation suite a batch was validated against, from its results' expectation configurations
    (long value sets stay shortened as in validation_results.json)."""
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    confs = []
    for r in js.get("results") or []:
        c = r["expectation_config"]
        confs.append(ExpectationConfiguration(
            type=c["type"], kwargs={k: v for k, v in c["kwargs"].items() if k != "batch_id"},
            meta=c.get("meta"), id=c.get("id")))
    return gx.ExpectationSuite(name=name, expectations=confs)


def offline(site: Path) -> None:
    """Make every page of the site readable with no network. GX loads Bootstrap, bootstrap-table, jQuery,
    Font Awesome, Vega and its logo from CDNs and fills the index's tables from JavaScript; here the
    bootstrap-table data become plain HTML tables, every script and external stylesheet goes, images come
    from GX's own static/images (or go), links to the web lose their href (their text stays), and so do
    relative links to files that do not exist (GX's favicon link on validation pages is one folder short: it
    is pointed at static/images). Our static/offline/offline.css (layout, tables, status icons as characters)
    and offline.js (the 'Failed Only' filter and the 'Show more info...' toggle in plain JS) are linked
    instead; the pages read without JavaScript too."""
    dest = site / "static" / "offline"
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(OFFLINE.iterdir()):
        if f.suffix in (".css", ".js"):
            shutil.copyfile(f, dest / f.name)
    images = site / "static" / "images"
    for page in site.rglob("*.html"):
        rel = Path(os.path.relpath(site, page.parent)).as_posix()

        def image(m: re.Match) -> str:
            return f'<img{m[1]}src="{rel}/static/images/{m[2]}"{m[3]}>' if (images / m[2]).is_file() else ""

        def url(m: re.Match) -> str:
            return f"url('{rel}/static/images/{m[1]}')" if (images / m[1]).is_file() else "none"

        def ref(m: re.Match) -> str:         # a relative link to a missing file: to static/images, or none
            path = m[1].split("#")[0].split("?")[0]
            if (page.parent / path).exists():
                return m[0]
            name = path.rsplit("/", 1)[-1]
            return m[0].replace(m[1], f"{rel}/static/images/{name}") if name and (images / name).is_file() else ""

        text = _static_tables(page.read_text(encoding="utf-8"))
        for pattern, repl in ((_SCRIPT, ""), (_EXT_LINK, ""), (_NEWSLETTER, ""), (_EXT_IMG, image),
                              (_EXT_URL, url), (_EXT_HREF, r"\1"), (_REL_REF, ref)):
            text = pattern.sub(repl, text)
        text = text.replace("</head>", f'<link rel="stylesheet" href="{rel}/static/offline/offline.css">\n'
                                       f'<script src="{rel}/static/offline/offline.js"></script>\n</head>', 1)
        page.write_text(text, encoding="utf-8")


def _static_tables(text: str) -> str:
    """Each empty bootstrap-table <table> filled from the columns and rows its script passes to
    bootstrapTable() (Python literals in GX's template); a row's batch id (else its first cell) links to its page,
    as GX's row click did."""
    for m in _BS_TABLE.finditer(text):
        tid, columns, rows = m["id"], ast.literal_eval(m["columns"]), ast.literal_eval(m["data"])
        rows.sort(key=_row_order)
        fields = [c["field"] for c in columns]
        linked = "batch_identifier" if "batch_identifier" in fields else fields[0]
        body = []
        for r in rows:
            cells = []
            for f in fields:
                cell = str(r.get(f, ""))
                if f == "validation_success" and r.get("_validation_success_text"):
                    cell += f'<span class="ge-status-text">{html.escape(r["_validation_success_text"])}</span>'
                if f == linked and r.get("_table_row_link_path"):
                    cell = f'<a href="{html.escape(r["_table_row_link_path"])}">{cell}</a>'
                cells.append(f"<td>{cell}</td>")
            body.append(f"<tr>{''.join(cells)}</tr>")
        head = "".join(f"<th>{html.escape(str(c.get('title', c['field'])))}</th>" for c in columns)
        table = (f'<table id="{tid}" class="table table-sm table-bordered ge-offline-table">'
                 f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")
        text = re.sub(rf'<table\s+id="{tid}"[^>]*>\s*</table>', lambda _: table, text, count=1)
        text = re.sub(rf'<div id="{tid}-toolbar"[^>]*>.*?</div>\s*', "", text, count=1, flags=re.S)
    return text


def _row_order(row: dict) -> tuple:
    """Newest run first (as GX sorts), then suite and batch (batch-2 before batch-10)."""
    def natural(s: Any) -> list:
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(s or ""))]

    suite = row.get("_expectation_suite_name_sort") or row.get("expectation_suite_name")
    return -float(row.get("_run_time_sort") or 0), natural(suite), natural(row.get("_batch_identifier_sort"))


def publish(data: str | Path, report: dict | None) -> dict | None:
    """Build the site and link it from the report (and from reports/validation.json)."""
    try:
        index = build(data)
    except Exception as e:        # the docs are a view of the results: never fail a validation over them
        index = None
        err = f"{type(e).__name__}: {e}"
    else:
        err = None
    if report is None:
        return None
    report = dict(report)
    if index is not None:
        report["data_docs"] = str(index.relative_to(Path(data) / "reports").as_posix())
    elif err:
        report["data_docs_error"] = err
    val = Path(data) / "reports" / "validation.json"
    if val.exists():
        from twinv2.io import read_json, write_json

        on_disk = read_json(val)
        on_disk.update({k: report[k] for k in ("data_docs", "data_docs_error") if k in report})
        write_json(val, on_disk)
    return report
