"""tinyserve.testing.check_op: a user kernel against the reference op, on randomized cases."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from tinyserve.errors import TinyserveError
from tinyserve.ops import OP_NAMES
from tinyserve.ops import reference as ref
from tinyserve.testing import CaseResult, OpCheck, check_op, current_layer, load_kernel, quant_module

HAVE_QUANT = quant_module() is not None


@pytest.mark.parametrize("name", OP_NAMES)
def test_reference_passes_against_itself(name):
    r = check_op(name, getattr(ref, name), cases=8, seed=3)
    assert isinstance(r, OpCheck) and r.passed, r.table()
    assert len(r.cases) == 8 and all(isinstance(c, CaseResult) for c in r.cases)
    assert all(c.nmse == 0.0 and c.max_err == 0.0 for c in r.cases)


def test_cases_are_randomized_and_awkward():
    r = check_op("linear", ref.linear, cases=24, seed=0)
    formats = {c.format for c in r.cases}
    assert {"float32", "float16", "bfloat16"} <= formats
    if HAVE_QUANT:
        assert {"int8", "int4"} <= formats
        assert any(" zp" in c.case for c in r.cases)  # int4 with zero points too
    ks = {int(c.case.split("K=")[1].split()[0]) for c in r.cases}
    assert any(k % 2 for k in ks) and len(ks) > 5  # odd reduction lengths
    other = check_op("linear", ref.linear, cases=24, seed=1)
    assert [c.case for c in other.cases] != [c.case for c in r.cases]


def linear_dropping_last_column(x, w, bias=None):
    """Off by one: the loop over the input dimension stops one column early."""
    if not isinstance(w, np.ndarray):
        from tinyserve.quant import dequantize

        w = dequantize(w)
    y = x[:, :-1] @ w[:, :-1].T
    return (y if bias is None else y + bias).astype(np.float32)


def test_float_off_by_one_kernel_is_caught():
    r = check_op("linear", linear_dropping_last_column, cases=12, formats=("float32",))
    assert not r.passed
    assert all(not c.passed and c.nmse > 1e-6 for c in r.cases if "K=1 " not in c.case)


@pytest.mark.skipif(not HAVE_QUANT, reason="tinyserve.quant (with quantize()) is not there yet")
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_group_boundary_bug_is_caught(fmt):
    """The last value of each group read with the next group's scale: caught; the correct kernel passes."""
    from tinyserve import quant

    def buggy(x, w, bias=None):
        if isinstance(w, np.ndarray):
            return ref.linear(x, w, bias)
        vals = quant.integer_values(w).astype(np.float32)  # (out, Kp)
        g = np.minimum((np.arange(vals.shape[1]) + 1) // w.group_size, w.n_groups - 1)
        return ref.linear(x, (vals * w.scales[:, g])[:, : w.shape[1]], bias)

    def correct(x, w, bias=None):  # scale factored out of each group's sum: another order, same math
        if isinstance(w, np.ndarray):
            return ref.linear(x, w, bias)
        out, k = w.shape
        vals = quant.integer_values(w).astype(np.float32).reshape(out, w.n_groups, w.group_size)
        xp = np.zeros((x.shape[0], w.padded_in), np.float32)
        xp[:, :k] = x
        partial = np.einsum("ngk,ogk->nog", xp.reshape(-1, w.n_groups, w.group_size), vals)  # per group sums
        y = (partial * w.scales[None]).sum(-1)
        return (y if bias is None else y + bias).astype(np.float32)

    bad = check_op("linear", buggy, cases=16, formats=(fmt,))
    def k_and_group(c):
        return int(c.case.split("K=")[1].split()[0]), int(c.case.split(" g")[1].split()[0])

    multi_group = [c for c in bad.cases if k_and_group(c)[0] > k_and_group(c)[1]]
    assert multi_group and all(not c.passed for c in multi_group), bad.table()
    good = check_op("linear", correct, cases=16, formats=(fmt,))
    assert good.passed, good.table()
    assert max(c.nmse for c in good.cases) > 0  # not the same bits: the tolerance did the work


@pytest.mark.skipif(importlib.util.find_spec("tinyserve.ops.cpu") is None, reason="ops/cpu.py not there yet")
def test_cpu_backend_linear_passes():
    from tinyserve.ops import cpu

    r = check_op("linear", cpu.linear, cases=12, seed=5)
    assert r.passed, r.table()


def test_wrong_shape_and_nan_fail_with_a_note():
    r = check_op("rmsnorm", lambda x, w, eps: ref.rmsnorm(x, w, eps)[:, 1:], cases=3)
    assert not r.passed and "shape" in r.cases[0].note
    r = check_op("swiglu", lambda g, u: np.full_like(g, np.nan), cases=3)
    assert not r.passed and all(c.nmse == float("inf") for c in r.cases)
    r = check_op("kv_write", lambda *a: None, cases=3)  # writes nothing: caches differ
    assert not r.passed


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(TinyserveError, match="unknown op 'matmul'"):
        check_op("matmul", ref.linear)

    def boom(*a):
        raise ValueError("kaput")

    with pytest.raises(TinyserveError, match="kernel for add raised ValueError: kaput"):
        check_op("add", boom)
    for spec in ("nocolon", "a:b:c", "mod:", ":fn", "bad-name:fn"):
        with pytest.raises(TinyserveError, match="package.module:function"):
            load_kernel(spec)
    with pytest.raises(TinyserveError, match="cannot import"):
        load_kernel("no_such_module_xyz:fn")
    with pytest.raises(TinyserveError, match="has no attribute"):
        load_kernel("tinyserve.ops.reference:nope")
    assert load_kernel("tinyserve.ops.reference:add") is ref.add


def test_current_layer_is_none_outside_a_forward():
    assert current_layer() is None
