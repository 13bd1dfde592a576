"""The one table of tolerances: tinyserve/tolerances.py and docs/tolerances.md say the same, and cover everything."""

from __future__ import annotations

from pathlib import Path

import pytest

from tinyserve.ops import OP_NAMES
from tinyserve.tolerances import HEADER, METRICS, TOLERANCES, model_limits, op_limits, passes

DOC = Path(__file__).resolve().parents[1] / "docs" / "tolerances.md"


def doc_table() -> dict:
    """The rows of the markdown table whose header is HEADER, keyed like TOLERANCES."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    head = "| " + " | ".join(HEADER) + " |"
    start = lines.index(head)
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip().replace("\\|", "|") for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == len(HEADER), line
        scope, item, fmt, metric, lim, measured, why = cells
        key = (scope, item, fmt, metric)
        assert key not in rows, f"row {key} twice in docs/tolerances.md"
        rows[key] = (float(lim), measured, why)
    return rows


def test_doc_table_equals_the_dict():
    rows = doc_table()
    assert set(rows) == set(TOLERANCES), (
        f"only in the doc: {sorted(set(rows) - set(TOLERANCES))}; "
        f"only in the dict: {sorted(set(TOLERANCES) - set(rows))}"
        " -- regenerate the table with `python -m tinyserve.tolerances`")
    for key, t in TOLERANCES.items():
        lim, measured, why = rows[key]
        assert lim == pytest.approx(t.limit, rel=1e-12, abs=0), key
        assert (measured, why) == (t.measured, t.why), key


def test_every_op_format_and_model_figure_has_a_limit():
    for op in OP_NAMES:
        assert set(op_limits(op)) == {"nmse", "max_rel"}
    for fmt in ("float32", "float16", "bfloat16", "int8", "int4"):
        op_limits("linear", fmt)
    for fmt in ("float32", "int8", "int4"):
        lim = model_limits(fmt)
        assert set(lim) == {"layer_nmse"} | {f"logits_{m}" for m in METRICS}
    for (scope, item, fmt, metric), t in TOLERANCES.items():
        assert scope in ("op", "model") and metric in METRICS and t.why, (scope, item, fmt, metric)
        assert t.limit >= 0


def test_limits_are_ordered_by_format():
    """A coarser format never has a tighter model-level budget."""
    f32, i8, i4 = model_limits("float32"), model_limits("int8"), model_limits("int4")
    for k in ("layer_nmse", "logits_nmse", "logits_max_rel", "logits_kl_mean", "logits_kl_max"):
        assert f32[k] <= i8[k] <= i4[k], k
    assert f32["logits_top1"] >= i8["logits_top1"] >= i4["logits_top1"]


def test_passes():
    assert passes("nmse", 1e-9, 1e-8) and not passes("nmse", 1e-7, 1e-8)
    assert passes("top1", 1.0, 1.0) and not passes("top1", 0.9, 1.0)
    assert not passes("nmse", float("nan"), 1.0)
