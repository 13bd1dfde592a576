"""Two trees of tinyserve on the same random weights, decode steps alternating in one process.

    python bench/ab_steps.py --old REV [--shape stories110M] [--quant int8] [--batch 16] [--kv-dtype float32]
                             [--steps 24] [--position 32] [--linears]
    python bench/ab_steps.py --switch Q4_DIGITS --shape llama-1b --quant int4 --batch 1

On a shared machine two runs of `tinyserve bench` a minute apart differ by 10-30%, more than most changes
are worth. Here the old tree (git revision REV of this repository, exported with `git archive` into a
temporary directory and imported under the package name `tinyserve_old`) and the working tree each load the
same random weights (`bench.load_for_bench`), and their decode steps alternate (old, new, then new, old, ...)
on caches of their own: neighbouring steps see the same machine, so the figure is the median over pairs of
new step time / old step time, with its quartiles. (Not free of bias: on the AMD machine, fifteenth session,
the llama-1b shape against itself, HEAD as both trees, gave 1.051 [1.028, 1.136], and a change measured both
ways round 1.152 one way in a fast minute and 0.981 the other way in a slow one: the tree loaded second reads
its 1.3 GB of weights slower when memory is fast. Run a change both ways round when the figure is within
~10% on the 1B shape.) Options such as TINYSERVE_INT8_ACTIVATIONS apply to both
trees (set them in the environment). Numba compiles the old tree's kernels on first use (cached afterwards).

--switch NAME: one tree and one model instead of two; the steps alternate with the boolean tinyserve.ops.cpu.NAME
off ("old") and on ("new"), for a switch the kernels' callers read at each call (Q4_DIGITS). One copy of
the weights, so none of the two-tree bias above.

--linears: instead of whole steps, one pass over the model's matrices (each layer's stacked q/k/v, o,
stacked gate/up and down, then the output head), one `linear` call each on `--batch` random rows: a step's
products alone, streamed from memory one after another, as in a step.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def export_old(rev: str, into: Path) -> None:
    """The tinyserve/ package of git revision rev, as into/tinyserve_old."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "tinyserve"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    (into / "tinyserve").rename(into / "tinyserve_old")


def _linear_pass(llm, rows: int):
    """A function that runs one `linear` call per weight matrix of llm (in step order) on `rows` random rows."""
    from tinyserve.model import STACKS

    ops, w = llm.ops, llm.weights
    mats = []
    for layer in w.layers:
        for group in ("qkv", "o", "gate_up", "down"):
            m = getattr(layer, f"{group}_proj")
            mats += [m] if m is not None else [getattr(layer, f"{p}_proj") for p in STACKS[group]]  # not stacked
    mats.append(w.lm_head)
    rng = np.random.default_rng(0)
    xs = {}
    for m in mats:
        k = m.shape[1]
        if k not in xs:
            xs[k] = rng.standard_normal((rows, k)).astype(np.float32)

    def run(i):
        for m in mats:
            ops.linear(xs[m.shape[1]], m)

    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--old", help="git revision to compare the working tree with")
    which.add_argument("--switch", help="a boolean of tinyserve.ops.cpu, off (old) against on (new), one model")
    p.add_argument("--shape", default="stories110M")
    p.add_argument("--quant", default="int8")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--kv-dtype", default="float32")
    p.add_argument("--steps", type=int, default=24, help="pairs of decode steps")
    p.add_argument("--position", type=int, default=32,
                   help="position of the first decode step: each token attends to this many cache rows and more")
    p.add_argument("--linears", action="store_true", help="time passes over the matrices, not decode steps")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, str(ROOT))
        kv = {} if args.kv_dtype == "float32" else {"kv_dtype": args.kv_dtype}  # an old tree may not know kv_dtype
        if args.switch:
            from tinyserve.ops import cpu

            if not isinstance(getattr(cpu, args.switch, None), bool):
                print(f"tinyserve.ops.cpu has no boolean {args.switch!r}", file=sys.stderr)
                return 2
            llm = importlib.import_module("tinyserve.bench").load_for_bench(None, args.shape, "cpu", args.quant, **kv)[1]
            models = {"old": llm, "new": llm}
        else:
            try:
                export_old(args.old, Path(tmp))
            except subprocess.CalledProcessError as e:
                print(f"cannot export {args.old!r}: {e.stderr.decode().strip() if e.stderr else e}", file=sys.stderr)
                return 2
            sys.path.insert(0, tmp)
            old_bench = importlib.import_module("tinyserve_old.bench")
            new_bench = importlib.import_module("tinyserve.bench")
            models = {"old": old_bench.load_for_bench(None, args.shape, "cpu", args.quant, **kv)[1],
                      "new": new_bench.load_for_bench(None, args.shape, "cpu", args.quant, **kv)[1]}

        def switched(k, fn):
            """fn, run with cpu.<switch> off for "old" and on for "new" (as it is without --switch)."""
            if not args.switch:
                return fn

            def run(i):
                saved = getattr(cpu, args.switch)
                setattr(cpu, args.switch, k == "new")
                try:
                    fn(i)
                finally:
                    setattr(cpu, args.switch, saved)
            return run

        B = args.batch
        if args.linears:
            step = {k: switched(k, _linear_pass(m, B)) for k, m in models.items()}
        else:
            context = args.position + args.steps + 4
            caches = {k: m.new_cache(B, context) for k, m in models.items()}
            tokens, slots = np.arange(B) + 7, np.arange(B)

            def decode(k, i):
                models[k].forward(tokens, np.full(B, args.position + i), slots, caches[k], phase="decode")

            step = {k: switched(k, functools.partial(decode, k)) for k in models}
        times = {"old": [], "new": []}
        for i in range(args.steps + 2):  # the first two pairs warm the caches up and are dropped
            for k in (("old", "new") if i % 2 == 0 else ("new", "old")):
                t0 = time.perf_counter()
                step[k](i)
                times[k].append(time.perf_counter() - t0)
        old, new = (np.array(times[k][2:]) for k in ("old", "new"))
        ratio = new / old
        env = " ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith("TINYSERVE_"))
        env += f" (cpu.{args.switch} off = old, on = new)" if args.switch else ""
        what = "linears" if args.linears else f"kv {args.kv_dtype} position {args.position}"
        print(f"{args.shape} {args.quant} batch {B} {what} {env}: {'pass' if args.linears else 'step'} old "
              f"{np.median(old) * 1e3:.2f} ms, new {np.median(new) * 1e3:.2f} ms; new / old, median of "
              f"{len(ratio)} pairs {np.median(ratio):.3f} "
              f"[quartiles {np.percentile(ratio, 25):.3f}, {np.percentile(ratio, 75):.3f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
