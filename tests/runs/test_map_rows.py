"""`DictionaryRun.map_rows`: the one reader of one unit's rows of a map table (the explorer's pages).

Independent reference: the same selection, order and limit done by hand in Python on the rows
written."""

from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deepseemoe.runs.dictionary import DictionaryRun


def _run(tmp_path):
    rng = random.Random(0)
    rows = [{"feature": f, "expert": e, "lift": round(rng.uniform(0, 4), 1), "count": rng.randint(0, 6)}
            for f in range(30) for e in range(8)]
    folder = tmp_path / "maps" / "sae"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "feature_experts.parquet", row_group_size=37)
    return DictionaryRun(tmp_path), rows


def test_one_units_rows_filtered_sorted_and_limited_as_by_hand(tmp_path):
    run, rows = _run(tmp_path)
    got = run.map_rows("sae", "feature_experts", ("expert", 3), ["feature", "lift", "count"],
                       order=(("lift", True), ("count", True), ("feature", False)), limit=5, at_least=("count", 3))
    mine = sorted((r for r in rows if r["expert"] == 3 and r["count"] >= 3),
                  key=lambda r: (-r["lift"], -r["count"], r["feature"]))[:5]
    assert got == [{"feature": r["feature"], "lift": r["lift"], "count": r["count"]} for r in mine]
    whole = run.map_rows("sae", "feature_experts", ("feature", 7))
    assert sorted(whole, key=lambda r: r["expert"]) == [r for r in rows if r["feature"] == 7]


def test_a_missing_table_is_no_rows_and_column_names_are_only_names(tmp_path):
    run, _ = _run(tmp_path)
    assert run.map_rows("sae", "router_attribution", ("feature", 1)) == []
    with pytest.raises(ValueError):
        run.map_rows("sae", "feature_experts", ("feature", 1), ["feature; DROP TABLE x"])
