"""Two trees of tinyserve on the same random weights, decode steps alternating in one process.

    python bench/ab_steps.py --old REV [--shape stories110M] [--quant int8] [--batch 16] [--kv-dtype float32]
                             [--steps 24] [--position 32]

On a shared machine two runs of `tinyserve bench` a minute apart differ by 10-30%, more than most changes
are worth. Here the old tree (git revision REV of this repository, exported with `git archive` into a
temporary directory and imported under the package name `tinyserve_old`) and the working tree each load the
same random weights (`bench.load_for_bench`), and their decode steps alternate (old, new, then new, old, ...)
on caches of their own: neighbouring steps see the same machine, so the figure is the median over pairs of
new step time / old step time, with its quartiles. Options such as TINYSERVE_INT8_ACTIVATIONS apply to both
trees (set them in the environment). Numba compiles the old tree's kernels on first use (cached afterwards).
"""

from __future__ import annotations

import argparse
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", required=True, help="git revision to compare the working tree with")
    p.add_argument("--shape", default="stories110M")
    p.add_argument("--quant", default="int8")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--kv-dtype", default="float32")
    p.add_argument("--steps", type=int, default=24, help="pairs of decode steps")
    p.add_argument("--position", type=int, default=32,
                   help="position of the first decode step: each token attends to this many cache rows and more")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            export_old(args.old, Path(tmp))
        except subprocess.CalledProcessError as e:
            print(f"cannot export {args.old!r}: {e.stderr.decode().strip() if e.stderr else e}", file=sys.stderr)
            return 2
        sys.path.insert(0, tmp)
        sys.path.insert(0, str(ROOT))
        old_bench = importlib.import_module("tinyserve_old.bench")
        new_bench = importlib.import_module("tinyserve.bench")
        kv = {} if args.kv_dtype == "float32" else {"kv_dtype": args.kv_dtype}  # an old tree may not know kv_dtype
        models = {"old": old_bench.load_for_bench(None, args.shape, "cpu", args.quant, **kv)[1],
                  "new": new_bench.load_for_bench(None, args.shape, "cpu", args.quant, **kv)[1]}
        B = args.batch
        context = args.position + args.steps + 4
        caches = {k: m.new_cache(B, context) for k, m in models.items()}
        tokens, slots = np.arange(B) + 7, np.arange(B)
        times = {"old": [], "new": []}
        for i in range(args.steps + 2):  # the first two pairs warm the caches up and are dropped
            for k in (("old", "new") if i % 2 == 0 else ("new", "old")):
                t0 = time.perf_counter()
                models[k].forward(tokens, np.full(B, args.position + i), slots, caches[k], phase="decode")
                times[k].append(time.perf_counter() - t0)
        old, new = (np.array(times[k][2:]) for k in ("old", "new"))
        ratio = new / old
        env = " ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith("TINYSERVE_"))
        print(f"{args.shape} {args.quant} batch {B} kv {args.kv_dtype} position {args.position} {env}: step old {np.median(old) * 1e3:.2f} ms, "
              f"new {np.median(new) * 1e3:.2f} ms; new / old, median of {len(ratio)} pairs {np.median(ratio):.3f} "
              f"[quartiles {np.percentile(ratio, 25):.3f}, {np.percentile(ratio, 75):.3f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
