"""The Great Expectations suites, one per table, as code, and the checkpoint that runs them on batches.

GX Core 1.x flow: ephemeral context -> pandas data source -> one dataframe asset per table -> a
whole-dataframe batch definition -> ExpectationSuite (built from rules.RULES plus the table-level
column check) -> ValidationDefinition -> Checkpoint. The same checkpoint is run on every batch
(a shard chunk of behaviours, the whole items / impressions table) with `batch_parameters={"dataframe": df}`.

Every expectation carries meta {"rule": <rule name>} so that GX's per-expectation unexpected counts
map back onto the vectorised masks of rules.py.
"""
from __future__ import annotations

import os
from typing import Any

import pandas as pd

from twinv2.data.schema import SCHEMAS
from twinv2.validation.rules import Bounds, active_rules

TABLE_COLUMNS = "schema_columns"   # table-level expectation: the canonical columns exist
NOT_EMPTY = "not_empty"


def build_suite(table: str, b: Bounds, whole_table: bool):
    """ExpectationSuite for `table`: every active row rule, then the table-level expectations."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx

    suite = gx.ExpectationSuite(name=f"twinv2_{table}")
    for rule in active_rules(table, b):
        for e in rule.gx(b):
            e.meta = {"rule": rule.name, "level": "row"}
            suite.add_expectation(e)
    required = [c for c in SCHEMAS[table].names if not (table == "impressions" and c == "p_true")]
    cols = gx.expectations.ExpectTableColumnsToMatchSet(column_set=required, exact_match=False)
    cols.meta = {"rule": TABLE_COLUMNS, "level": "table"}
    suite.add_expectation(cols)
    if whole_table:   # a row count only means something on the whole table, not on one shard
        rows = gx.expectations.ExpectTableRowCountToBeBetween(min_value=1)
        rows.meta = {"rule": NOT_EMPTY, "level": "table"}
        suite.add_expectation(rows)
    return suite


class GXChecker:
    """One table's checkpoint, built once and run on each batch."""

    def __init__(self, table: str, b: Bounds, whole_table: bool, result_format: str | dict = "BASIC"):
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.table = table
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        asset = self.context.data_sources.add_pandas(f"{table}_source").add_dataframe_asset(table)
        batch = asset.add_batch_definition_whole_dataframe(f"{table}_batch")
        self.suite = self.context.suites.add(build_suite(table, b, whole_table))
        vd = self.context.validation_definitions.add(
            gx.ValidationDefinition(name=f"{table}_validation", data=batch, suite=self.suite))
        fmt = result_format if isinstance(result_format, dict) else {"result_format": result_format}
        self.checkpoint = self.context.checkpoints.add(
            gx.Checkpoint(name=f"{table}_checkpoint", validation_definitions=[vd], result_format=fmt))

    def run(self, df: pd.DataFrame) -> tuple[dict[str, dict[str, Any]], dict]:
        """Validate one batch. Returns ({rule: {"unexpected_count", "success", "unexpected_index_list"?}},
        GX's full validation result as a JSON-able dict)."""
        result = self.checkpoint.run(batch_parameters={"dataframe": df})
        (vr,) = result.run_results.values()
        by_rule: dict[str, dict[str, Any]] = {}
        for er in vr.results:
            rule = (er.expectation_config.meta or {}).get("rule", er.expectation_config.type)
            if er.exception_info and er.exception_info.get("raised_exception"):
                raise RuntimeError(f"GX expectation {er.expectation_config.type} on {self.table} raised: "
                                   f"{er.exception_info.get('exception_message')}")
            agg = by_rule.setdefault(rule, {"unexpected_count": 0, "success": True})
            agg["unexpected_count"] += int(er.result.get("unexpected_count") or 0)
            agg["success"] = agg["success"] and bool(er.success)
            if "unexpected_index_list" in er.result:
                agg.setdefault("unexpected_index_list", []).extend(er.result["unexpected_index_list"])
        return by_rule, _compact(vr.to_json_dict())


def _compact(obj: Any, limit: int = 50) -> Any:
    """GX's JSON with long value sets (e.g. every known item id) shortened, so reports stay small."""
    if isinstance(obj, dict):
        return {k: _compact(v, limit) for k, v in obj.items()}
    if isinstance(obj, list):
        if len(obj) > limit and all(isinstance(x, (int, float, str)) for x in obj[:limit]):
            return obj[:limit] + [f"... {len(obj) - limit} more"]
        return [_compact(x, limit) for x in obj]
    return obj
