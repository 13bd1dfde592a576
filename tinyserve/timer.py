"""The instrumented timer: where every millisecond and byte went.

    timer = Timer()
    llm = tinyserve.load(DIR, timer=timer)           # load and compile phases are timed
    llm.generate(prompts)                            # prefill / decode phases, every op call, sampling
    print(timer.report().table())

What it measures
- phases: load, compile (JIT warm-up), prefill (steps that admit a new prompt), decode (the other steps);
- every op call, by op name and by role in the model: embedding, qkv (input norm, q/k/v projections, RoPE,
  cache write), attention (attention and o_proj), mlp (post-attention norm, gate/up/down, SwiGLU),
  residual (the adds), logits (final norm, output head), sampling. For each: calls, seconds, bytes moved
  and floating-point operations, hence GB/s and GFLOP/s. Bytes and FLOPs are counted from the arrays'
  shapes (what the op must read and write at least), not measured by hardware counters;
- per request (from the generator): time to first token, time per output token (mean, p50, p90), tokens/s;
- the whole run: generated tokens / wall time, and the process's peak resident memory.

How: the timer wraps the backend's ops module in a proxy whose functions time each call (synchronizing the
GPU first where the backend has asynchronous kernels). With no timer, the engine calls the ops directly:
the cost is exactly zero. With the timer on, each op call costs two clock reads, one dict lookup and two
additions (about a microsecond); `bench/timer_overhead.py` measures what that does to decode tokens/s.
"""

from __future__ import annotations

import resource
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from .ops import OP_NAMES

ROLES = ("embedding", "qkv", "attention", "mlp", "residual", "logits", "sampling")


def _nbytes(a) -> int:
    """Bytes of an array or a quantized tensor (its packed data, scales and zero points)."""
    if a is None:
        return 0
    nb = getattr(a, "nbytes", None)
    if nb is not None:
        return int(nb)
    return int(np.prod(a.shape)) * a.dtype.itemsize


def op_cost(name: str, args, out) -> tuple[int, int]:
    """(bytes moved, floating-point operations) of one op call, from its arguments' shapes."""
    if name == "linear":
        x, w = args[0], args[1]
        bias = args[2] if len(args) > 2 else None
        n, (o, i) = x.shape[0], w.shape
        return _nbytes(x) + _nbytes(w) + _nbytes(bias) + n * o * 4, 2 * n * o * i
    if name == "attention":
        q, k_cache, _v, slots, positions = args[:5]
        pos = np.asarray(positions.copy_to_host() if hasattr(positions, "copy_to_host") else positions)
        sl = np.asarray(slots.copy_to_host() if hasattr(slots, "copy_to_host") else slots)
        n, h, hd = q.shape
        kvh = k_cache.shape[1]
        # every sequence's visible keys and values are read once; each query scores and mixes them
        if n == 1:
            visible = int(pos[0]) + 1
        else:
            seen = {}
            for s, p in zip(sl.tolist(), pos.tolist()):
                seen[s] = max(seen.get(s, 0), p + 1)
            visible = sum(seen.values())
        flops = 4 * (int(pos.sum()) + n) * h * hd
        return 2 * visible * kvh * hd * 4 + 2 * _nbytes(q), flops
    if name == "rmsnorm":
        x = args[0]
        return 2 * _nbytes(x) + _nbytes(args[1]), 4 * x.size
    if name == "rope":
        x = args[0]
        return 2 * _nbytes(x), 6 * x.size
    if name == "kv_write":
        return 2 * (_nbytes(args[2]) + _nbytes(args[3])), 0
    if name in ("swiglu", "add"):
        return 3 * _nbytes(args[0]), (5 if name == "swiglu" else 1) * args[0].size
    if name == "take_rows":
        return 2 * _nbytes(out), 0
    return 0, 0


@dataclass
class OpStat:
    calls: int = 0
    seconds: float = 0.0
    bytes: int = 0
    flops: int = 0

    def add(self, dt, nbytes, flops):
        self.merge(1, dt, nbytes, flops)

    def merge(self, calls, seconds, nbytes, flops):
        self.calls += calls
        self.seconds += seconds
        self.bytes += nbytes
        self.flops += flops

    def as_dict(self) -> dict:
        return dict(
            calls=self.calls, seconds=self.seconds, bytes=self.bytes, flops=self.flops,
            gb_s=self.bytes / self.seconds / 1e9 if self.seconds > 0 else None,
            gflop_s=self.flops / self.seconds / 1e9 if self.seconds > 0 else None,
        )


class TimedOps:
    """A stand-in for a backend's ops module that times every op call (see Timer.wrap)."""

    def __init__(self, ops, timer: "Timer", roles: dict):
        self._ops = ops
        self._timer = timer
        self._roles = roles  # (op name, id(first weight-like argument)) -> role
        sync = getattr(ops, "synchronize", None)
        for name in OP_NAMES:
            setattr(self, name, self._timed(name, getattr(ops, name), sync))

    def __getattr__(self, name):  # upload, download, zeros, warmup, ...: untimed
        return getattr(self._ops, name)

    def _timed(self, name, fn, sync):
        timer, roles = self._timer, self._roles
        key_arg = {"take_rows": 0, "rmsnorm": 1, "linear": 1}.get(name)
        fixed_role = {"rope": "qkv", "kv_write": "qkv", "attention": "attention", "swiglu": "mlp",
                      "add": "residual"}.get(name)
        # Role, bytes and FLOPs of a call follow from its weight and the shape of its first argument, except
        # for attention (its cost depends on the positions). So each (weight, shape) gets a tally
        # [op, role, bytes per call, FLOPs per call, calls, seconds], made at its first call; a later call
        # only bumps two numbers (the timer's own cost per call is about a microsecond).
        known = {}
        clock = time.perf_counter

        def call(*args):
            if sync:
                sync()
            t0 = clock()
            out = fn(*args)
            if sync:
                sync()
            dt = clock() - t0
            if name == "attention":
                nbytes, flops = op_cost(name, args, out)
                timer.ops[name].add(dt, nbytes, flops)
                timer.roles["attention"].add(dt, nbytes, flops)
                role = "attention"
            else:
                key = (id(args[key_arg]) if key_arg is not None else None, args[0].shape)
                tally = known.get(key)
                if tally is None:
                    role = fixed_role or roles.get((name, key[0]), "logits")
                    tally = known[key] = [name, role, *op_cost(name, args, out), 0, 0.0]
                    timer.tallies.append(tally)
                tally[4] += 1
                tally[5] += dt
                role = tally[1]
            if timer.per_step is not None:
                timer.per_step[(name, role)] = timer.per_step.get((name, role), 0) + 1
            return out

        return call


def weight_roles(weights) -> dict:
    """Which role each weight plays, keyed by (op name, id(weight)) so one array may play two roles."""
    roles = {("take_rows", id(weights.embed_tokens)): "embedding",
             ("rmsnorm", id(weights.norm)): "logits", ("linear", id(weights.lm_head)): "logits"}
    for layer in weights.layers:
        roles[("rmsnorm", id(layer.input_layernorm))] = "qkv"
        roles[("rmsnorm", id(layer.post_attention_layernorm))] = "mlp"
        for n in ("q_proj", "k_proj", "v_proj"):
            roles[("linear", id(getattr(layer, n)))] = "qkv"
        roles[("linear", id(layer.o_proj))] = "attention"
        for n in ("gate_proj", "up_proj", "down_proj"):
            roles[("linear", id(getattr(layer, n)))] = "mlp"
    return roles


class Timer:
    def __init__(self):
        self.phases: dict[str, float] = defaultdict(float)
        self.phase_calls: dict[str, int] = defaultdict(int)
        self.ops: dict[str, OpStat] = defaultdict(OpStat)
        self.roles: dict[str, OpStat] = defaultdict(OpStat)
        self.tallies: list[list] = []  # [op, role, bytes per call, FLOPs per call, calls, seconds] (TimedOps)
        self.requests: list = []
        self.per_step: dict | None = None  # set to {} to count calls of one step (tests)
        self.wall_start = time.perf_counter()

    def wrap(self, ops, weights) -> TimedOps:
        return TimedOps(ops, self, weight_roles(weights))

    def add_phase(self, name: str, seconds: float) -> None:
        self.phases[name] += seconds
        self.phase_calls[name] += 1

    def add_sampling(self, seconds: float) -> None:
        self.roles["sampling"].add(seconds, 0, 0)

    def add_request(self, result) -> None:
        self.requests.append(result)

    # -------------------------------------------------------------------------------------------- report
    def totals(self) -> tuple[dict, dict]:
        """(per op, per role) OpStats: the direct accumulators plus every tally folded in."""
        ops, roles = defaultdict(OpStat), defaultdict(OpStat)
        for target, source in ((ops, self.ops), (roles, self.roles)):
            for k, v in source.items():
                target[k].merge(v.calls, v.seconds, v.bytes, v.flops)
        for name, role, nbytes, flops, calls, seconds in self.tallies:
            ops[name].merge(calls, seconds, nbytes * calls, flops * calls)
            roles[role].merge(calls, seconds, nbytes * calls, flops * calls)
        return ops, roles

    def report(self) -> "TimerReport":
        return TimerReport(self)


def _percentile(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else None


@dataclass
class TimerReport:
    timer: Timer
    data: dict = field(init=False)

    def __post_init__(self):
        t = self.timer
        reqs = []
        gen_tokens = 0
        for r in t.requests:
            gaps = np.diff(r.token_times) if len(r.token_times) > 1 else np.array([])
            n = len(r.token_ids)
            gen_tokens += n
            reqs.append(dict(
                id=r.request_id, prompt_tokens=r.prompt_tokens, generated_tokens=n,
                ttft_s=r.ttft, tpot_mean_s=float(gaps.mean()) if gaps.size else None,
                tpot_p50_s=_percentile(gaps, 50), tpot_p90_s=_percentile(gaps, 90),
                tokens_per_s=n / r.seconds if r.seconds > 0 else None,
            ))
        wall = (max(r.finished for r in t.requests) - min(r.started for r in t.requests)) if t.requests else 0.0
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
        ops, roles = t.totals()
        self.data = dict(
            phases={k: dict(seconds=v, calls=t.phase_calls[k]) for k, v in t.phases.items()},
            ops={k: v.as_dict() for k, v in sorted(ops.items(), key=lambda kv: -kv[1].seconds)},
            roles={k: roles[k].as_dict() for k in ROLES if k in roles},
            requests=reqs,
            throughput=dict(generated_tokens=gen_tokens, seconds=wall,
                            tokens_per_s=gen_tokens / wall if wall > 0 else None),
            peak_rss_bytes=peak_kb * 1024 if sys.platform != "darwin" else peak_kb,
        )

    def as_dict(self) -> dict:
        return self.data

    def table(self) -> str:
        d = self.data
        lines = ["", "phase      seconds   calls"]
        for k in ("load", "compile", "prefill", "decode"):
            if k in d["phases"]:
                p = d["phases"][k]
                lines.append(f"{k:<10} {p['seconds']:8.3f} {p['calls']:7d}")
        total = sum(v["seconds"] for v in d["ops"].values()) or 1.0

        def rows(title, items):
            lines.append("")
            lines.append(f"{title:<12} {'calls':>7} {'ms':>9} {'%':>6} {'MB':>9} {'GB/s':>7} {'GFLOP/s':>8}")
            for k, v in items:
                gbs = f"{v['gb_s']:7.2f}" if v["gb_s"] is not None else "      -"
                gfl = f"{v['gflop_s']:8.2f}" if v["gflop_s"] is not None else "       -"
                lines.append(f"{k:<12} {v['calls']:7d} {v['seconds'] * 1e3:9.2f} {100 * v['seconds'] / total:6.1f} "
                             f"{v['bytes'] / 1e6:9.2f} {gbs} {gfl}")

        rows("op", d["ops"].items())
        rows("role", d["roles"].items())
        if d["requests"]:
            lines.append("")
            lines.append("request  prompt  tokens  TTFT ms  TPOT ms (mean/p50/p90)   tok/s")
            for r in d["requests"]:
                def ms(x):
                    return f"{x * 1e3:.2f}" if x is not None else "-"
                lines.append(f"{str(r['id']):<8} {r['prompt_tokens']:6d} {r['generated_tokens']:7d} {ms(r['ttft_s']):>8}"
                             f"  {ms(r['tpot_mean_s'])}/{ms(r['tpot_p50_s'])}/{ms(r['tpot_p90_s'])}"
                             f"  {r['tokens_per_s'] or 0:9.1f}")
        th = d["throughput"]
        if th["tokens_per_s"]:
            lines.append("")
            lines.append(f"throughput: {th['generated_tokens']} tokens in {th['seconds']:.3f} s = "
                         f"{th['tokens_per_s']:.1f} tokens/s")
        lines.append(f"peak resident memory: {d['peak_rss_bytes'] / 2**20:.1f} MiB")
        return "\n".join(lines)
