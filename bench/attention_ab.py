"""Attention's compile-time constants against each other, in one process, on caches that come from memory.

    python bench/attention_ab.py [--shape stories110M] [--batch 16] [--position 80] [--kv-dtype float16]
                                 --variant ATTENTION_NEXT_TASKS=1 --variant ATTENTION_PREFETCH=True ...

ops/cpu.py's `_attention` reads module constants when Numba compiles it (ATTENTION_NEXT, ATTENTION_NEXT_TASKS,
ATTENTION_NEXT_ROWS, ATTENTION_PREFETCH, ATTENTION_AHEAD): a decode step cannot switch them, and two trees of
the package loaded side by side (bench/ab_steps.py --old) differ by up to 17% when they are the same tree. Here
each variant is a copy of `_attention` compiled with the given constants replaced (the others as the module
has them), and the copies are called in turns, one layer each, on enough layers' KV caches (random, of the
shape's heads and head size) that every call reads its keys and values from memory, as a decode step's
attention does. Each variant is reported as the median over calls of its time / the time of the module's own
constants in the same turn, with quartiles, and in cache (the same layer again) for scale.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import textwrap
import time

import numpy as np
from numba import njit

from tinyserve.bench import SHAPES, shape_config
from tinyserve.ops import cpu


def compiled(overrides: dict):
    """A copy of cpu._attention compiled with the module's globals, `overrides` replacing some."""
    src = textwrap.dedent(inspect.getsource(cpu._attention.py_func))
    src = src[src.index("def _attention"):]  # without the decorator
    scope = dict(cpu.__dict__)
    scope.update(overrides)
    exec(src, scope)
    return njit(parallel=True, fastmath=cpu.REDUCE)(scope["_attention"])


def parse_variant(text: str) -> dict:
    out = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if not hasattr(cpu, name.strip()):
            raise SystemExit(f"tinyserve.ops.cpu has no constant {name.strip()!r}")
        out[name.strip()] = ast.literal_eval(value.strip())
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="stories110M", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--position", type=int, default=80, help="each sequence's position (+0..2, so spans differ)")
    p.add_argument("--kv-dtype", default="float16", choices=("float32", "float16"))
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=VALUE[,NAME=VALUE]: constants of ops/cpu.py for one copy (repeatable)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--layers", type=int, default=0, help="how many layers' caches (default: ~3x a 32 MiB L3)")
    args = p.parse_args()
    cfg = shape_config(args.shape)
    N, H, KVH = args.batch, cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // H
    ctx = args.position + 4
    dtype = np.float16 if args.kv_dtype == "float16" else np.float32
    per_layer = 2 * N * KVH * ctx * hd * np.dtype(dtype).itemsize
    layers = args.layers or max(8, int(96 * 2**20 // per_layer) + 1)  # past a 32 MiB L3 three times over
    rng = np.random.default_rng(0)

    def cache():
        a = rng.standard_normal((N, KVH, ctx, hd)).astype(dtype)
        return a.view(np.uint16) if dtype == np.float16 else a  # the kernel takes float16 as its bits

    ks, vs = [cache() for _ in range(layers)], [cache() for _ in range(layers)]
    q = rng.standard_normal((N, H, hd)).astype(np.float32)
    slots, positions = np.arange(N), args.position + np.arange(N) % 3
    out = np.empty_like(q)
    scores = np.empty((N * KVH, H // KVH, ctx + 1), np.float32)
    variants = {"as in ops/cpu.py": compiled({})}
    for v in args.variant:
        variants[v] = compiled(parse_variant(v))
    names = list(variants)
    for f in variants.values():  # compile
        f(q, ks[0], vs[0], slots, positions, 0, out, scores)
    times = {k: [] for k in names}
    c = 0
    for _ in range(args.rounds):
        for layer in range(layers):
            for k in names[layer % len(names):] + names[:layer % len(names)]:  # each variant first in turn
                c += 1
                t0 = time.perf_counter()
                variants[k](q, ks[c % layers], vs[(c + 5) % layers], slots, positions, 0, out, scores)
                times[k].append(time.perf_counter() - t0)
    warm = []
    for _ in range(200):
        t0 = time.perf_counter()
        variants[names[0]](q, ks[0], vs[0], slots, positions, 0, out, scores)
        warm.append(time.perf_counter() - t0)
    base = np.array(times[names[0]])
    read = 2 * N * KVH * (args.position + 2) * hd * np.dtype(dtype).itemsize  # about what a call reads
    print(f"{args.shape} attention, batch {N}, position ~{args.position}, {args.kv_dtype} cache, {layers} layers' "
          f"caches, {len(base)} calls each; in cache {np.median(warm) * 1e6:.1f} us a layer")
    for k in names:
        t = np.array(times[k])
        r = t / base
        print(f"  {k:40s} {np.median(t) * 1e6:8.1f} us a layer ({read / np.median(t) / 1e9:5.1f} GB/s); "
              f"/ as in ops/cpu.py {np.median(r):.3f} [{np.percentile(r, 25):.3f}, {np.percentile(r, 75):.3f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
