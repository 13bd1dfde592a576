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

How: the timer wraps the backend's ops module in a proxy whose functions time each call (waiting for the GPU
after each call where the backend has asynchronous kernels). With no timer, the engine calls the ops
directly: the cost is exactly zero. With the timer on, each op call costs one clock read after it and one
append (see TimedOps): a call's time runs from the end of the call before it to its own end, so the calls
of a step add up to the step, the Python between them included. The records are folded into per-op
tallies every few thousand calls and when a report is made. `bench/timer_overhead.py` measures what that
does to decode tokens/s.
"""

from __future__ import annotations

import resource
import sys
import time
from array import array
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


def op_cost(name: str, key, shape) -> tuple[int, int]:
    """(bytes moved, floating-point operations) of one op call, from its log record (TimedOps): what the op
    must read and write at least, counted from shapes; activations are float32."""
    size = int(np.prod(shape))
    if name == "linear":
        w, bias = key[0], key[1] if len(key) > 1 else None
        n, (o, i) = size // shape[-1], w.shape
        return 4 * size + _nbytes(w) + _nbytes(bias) + 4 * n * o, 2 * n * o * i
    if name == "attention":
        return _attention_cost(shape, key[0].shape[1], key[2], key[3], key[0].dtype.itemsize)
    if name == "rmsnorm":
        return 2 * 4 * size + _nbytes(key), 4 * size
    if name == "add_rmsnorm":  # x and branch read, the sum and its norm written; the add, then rmsnorm's 4
        return 4 * 4 * size + _nbytes(key), 5 * size
    if name == "rope":
        return 2 * 4 * size, 6 * size
    if name == "kv_write":
        return 2 * (4 + key) * size, 0  # keys and values, each read (float32) and written (key: the cache's itemsize)
    if name == "rope_kv_write":  # rope of q (shape), and kv_write of the rotated keys (key: itemsize, k's shape)
        itemsize, k_size = key[0], int(np.prod(key[1]))
        return 2 * 4 * size + 2 * (4 + itemsize) * k_size, 6 * (size + k_size)
    if name in ("swiglu", "add"):
        return 3 * 4 * size, (5 if name == "swiglu" else 1) * size
    if name == "take_rows":
        return 2 * 4 * size, 0
    return 0, 0


def _attention_cost(q_shape, kv_heads: int, slots, positions, itemsize: int = 4) -> tuple[int, int]:
    """Every sequence's visible keys and values (itemsize bytes each) are read once; each query scores and
    mixes them."""
    pos = np.asarray(positions.copy_to_host() if hasattr(positions, "copy_to_host") else positions)
    n, h, hd = q_shape
    if n == 1:
        visible = int(pos[0]) + 1
    else:
        sl = np.asarray(slots.copy_to_host() if hasattr(slots, "copy_to_host") else slots)
        seen = {}
        for s, p in zip(sl.tolist(), pos.tolist()):
            seen[s] = max(seen.get(s, 0), p + 1)
        visible = sum(seen.values())
    return 2 * visible * kv_heads * hd * itemsize + 2 * 4 * n * h * hd, 4 * (int(pos.sum()) + n) * h * hd


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
    """A stand-in for a backend's ops module that times every op call (see Timer.wrap).

    Between two kernels that have just streamed megabytes through the caches, every Python object the timer
    touches is a cache miss: a first version that looked up and updated its tallies inside each call cost
    7-8% of a stories110M int8 decode step, although it measured 0.4 us per call in a loop. So a call does
    as little as possible, and the bookkeeping happens once per step:

    - a forward step's sequence of op calls depends only on its number of tokens and of logit rows (its
      signature). The first step of a signature runs "full" closures that append one record per call to the
      timer's log: (op, key, shape, seconds), where key and shape decide the call's role, bytes and FLOPs
      (op_cost). From those records the step's template is made: the tally of each call site.
    - later steps of that signature run "fast" closures that only append the clock after the call to an
      array of doubles, which begin_step starts with the clock at the start of the step; end_step checks
      that the step made as many calls as its template. Every few thousand calls (and for a report) fold()
      turns each step's stamps into the seconds of each call (differences of consecutive stamps) and adds
      them to its template's per-site sums, one NumPy add per step, and counts attention's bytes and FLOPs
      from each step's positions. (Doing that NumPy work after every step cost as much again as the calls
      themselves: cold caches again.)

    So a call's time runs from the end of the call before it (or the start of the step) to its own end: the
    Python that prepares its arguments (a reshape, the model's loop) is part of it, and the calls of a step
    add up to the step. One clock read per call instead of two around it, and no name logged: the fast
    path costs a forwarding proxy plus one clock read and one append (docs/performance.md, "The timer's
    cost"). The first step of a signature times its calls the same way.

    Records hold only weights and the step's own inputs (slots, positions), never an intermediate
    activation, so the log keeps no large array alive. bench/timer_overhead.py measures what is left.
    """

    def __init__(self, ops, timer: "Timer", roles: dict):
        self._ops = ops
        self._timer = timer
        timer.weight_roles.update(roles)
        timer.timed_ops.append(self)
        self._stamps = array("d")  # fast steps since the last fold: the clock at each start and after each call
        self._mark = None  # where the current fast step's stamps begin, until its end_step
        self._last = [time.perf_counter()]  # full steps: the clock after the previous call (or at the start)
        self._steps: list[tuple] = []  # (template, slots, positions) of each of those steps, in order
        self._templates: dict = {}  # signature -> _Template
        self._step = None  # (template or None, signature, log length at the start, slots, positions)
        self._sync = sync = getattr(ops, "synchronize", None)
        self._full = {name: self._timed_full(name, getattr(ops, name), sync) for name in OP_NAMES}
        self._fast = {name: self._timed_fast(getattr(ops, name), sync) for name in OP_NAMES}
        self._mode = None
        self._use(self._full)

    def __getattr__(self, name):  # upload, download, zeros, warmup, ...: untimed
        return getattr(self._ops, name)

    def _use(self, closures) -> None:
        if self._mode is not closures:
            self.__dict__.update(closures)
            self._mode = closures

    def begin_step(self, signature, slots, positions) -> None:
        """Before a forward step: signature = (tokens, logit rows), or None to record every call in full."""
        if self._mark is not None:  # a step that raised before end_step: its fast-mode stamps are dropped
            del self._stamps[self._mark:]
            self._mark = None
        template = self._templates.get(signature) if signature is not None else None
        self._step = (template, signature, len(self._timer.log), slots, positions)
        if self._sync is not None:  # work still queued from before the step is not the step's
            self._sync()
        if template is not None:
            self._use(self._fast)
            self._mark = len(self._stamps)
            self._stamps.append(time.perf_counter())
        else:
            self._use(self._full)
            self._last[0] = time.perf_counter()

    def end_step(self) -> None:
        template, signature, start, slots, positions = self._step
        self._step = None
        timer = self._timer
        if template is None:
            if signature is not None:
                self._templates[signature] = _Template(timer, timer.log[start:])
        else:
            if len(self._stamps) - self._mark - 1 == len(template.names):
                self._steps.append((template, slots, positions))
            else:  # not as many calls as this signature made before (a swapped-in model?): times not split
                del self._stamps[self._mark:]
                self._templates.pop(signature)
            self._mark = None
        if len(timer.log) >= timer.FLUSH_EVERY or len(self._stamps) >= timer.FLUSH_EVERY \
                or timer.per_step is not None:
            timer.flush()

    def fold(self) -> None:
        """Add the fast steps' seconds (and attention's bytes and FLOPs) to their templates' tallies."""
        stamps = np.frombuffer(self._stamps) if self._steps else None
        at = 0
        for template, slots, positions in self._steps:
            n = len(template.names)
            template.add(np.diff(stamps[at:at + n + 1]), slots, positions)  # each call: from the stamp before
            at += n + 1
        del stamps  # release the buffer before the array shrinks
        self._steps.clear()
        del self._stamps[:at]  # a step still running (a report from inside it) keeps its stamps
        if self._mark is not None:
            self._mark -= at
        for template in self._templates.values():
            template.fold(self._timer)

    def _timed_full(self, name, fn, sync):
        record, append, clock, last = _RECORDS[name], self._timer.log.append, time.perf_counter, self._last

        def call(*args):
            out = fn(*args)
            if sync:
                sync()
            t = clock()
            append((name, *record(args), t - last[0]))
            last[0] = t
            return out

        return call

    def _timed_fast(self, fn, sync):
        stamp, clock = self._stamps.append, time.perf_counter
        if sync is not None:  # asynchronous backend: the op's kernels finish before its stamp
            def call(*args):
                out = fn(*args)
                sync()
                stamp(clock())
                return out
        else:
            def call(*args):
                out = fn(*args)
                stamp(clock())
                return out
        return call


class _Template:
    """The call sites of one step signature (from the records of its first step) and, for the later steps of
    that signature, the seconds spent at each site, summed, until Timer.flush folds them into the tallies."""

    def __init__(self, timer: "Timer", records: list):
        self.names = [r[0] for r in records]
        self.sites = [timer.tally_for(*r[:3]) if r[0] != "attention" else None for r in records]
        self.attention = np.array([i for i, r in enumerate(records) if r[0] == "attention"], np.int64)
        first = records[self.attention[0]] if self.attention.size else None
        # (q's shape, KV heads, the cache's itemsize)
        self.geometry = (first[2], first[1][0].shape[1], first[1][0].dtype.itemsize) if first else None
        self.seconds = np.zeros(len(records))
        self.steps = 0
        self.attention_bytes = self.attention_flops = 0

    def add(self, seconds: np.ndarray, slots, positions) -> None:
        self.seconds += seconds
        self.steps += 1
        if self.geometry is not None:
            q_shape, kv_heads, itemsize = self.geometry
            nbytes, flops = _attention_cost(q_shape, kv_heads, slots, positions, itemsize)
            self.attention_bytes += nbytes * self.attention.size
            self.attention_flops += flops * self.attention.size

    def fold(self, timer: "Timer") -> None:
        if not self.steps:
            return
        for tally, seconds in zip(self.sites, self.seconds.tolist()):
            if tally is not None:
                tally[4] += self.steps
                tally[5] += seconds
        if self.attention.size:
            calls, seconds = self.steps * self.attention.size, float(self.seconds[self.attention].sum())
            for stat in (timer.ops["attention"], timer.roles["attention"]):
                stat.merge(calls, seconds, self.attention_bytes, self.attention_flops)
        if timer.per_step is not None:
            for name, tally in zip(self.names, self.sites):
                key = (name, tally[1] if tally is not None else "attention")
                timer.per_step[key] = timer.per_step.get(key, 0) + self.steps
        self.seconds[:] = 0.0
        self.steps = 0
        self.attention_bytes = self.attention_flops = 0


# (key, shape) of each op's log record, from its arguments (see op_cost for how they are used)
_RECORDS = {
    "linear": lambda a: (a[1:], a[0].shape),                        # (weight[, bias]), x's shape
    "rmsnorm": lambda a: (a[1], a[0].shape),                        # weight, x's shape
    "add_rmsnorm": lambda a: (a[2], a[0].shape),                    # weight, x's shape
    "take_rows": lambda a: (id(a[0]), (a[1].shape[0], a[0].shape[-1])),  # which table, shape of the rows out
    "rope": lambda a: (None, a[0].shape),
    "kv_write": lambda a: (a[0].dtype.itemsize, a[2].shape),        # the cache's itemsize, shape of the new keys
    "rope_kv_write": lambda a: ((a[3].dtype.itemsize, a[1].shape), a[0].shape),  # (itemsize, k's shape), q's
    "attention": lambda a: (a[1:5], a[0].shape),                    # (k_cache, v_cache, slots, positions), q
    "swiglu": lambda a: (None, a[0].shape),
    "add": lambda a: (None, a[0].shape),
}


_FIXED_ROLES = {"rope": "qkv", "kv_write": "qkv", "rope_kv_write": "qkv", "swiglu": "mlp", "add": "residual"}


def weight_roles(weights) -> dict:
    """Which role each weight plays, keyed by (op name, id(weight)) so one array may play two roles."""
    roles = {("take_rows", id(weights.embed_tokens)): "embedding",
             ("rmsnorm", id(weights.norm)): "logits", ("add_rmsnorm", id(weights.norm)): "logits",
             ("linear", id(weights.lm_head)): "logits"}
    for layer in weights.layers:  # a norm (alone or with the residual add before it) belongs to the block it feeds
        for op in ("rmsnorm", "add_rmsnorm"):
            roles[(op, id(layer.input_layernorm))] = "qkv"
            roles[(op, id(layer.post_attention_layernorm))] = "mlp"
        for n in ("q_proj", "k_proj", "v_proj", "qkv_proj"):  # separate, or stacked (model.stack_projections)
            if getattr(layer, n) is not None:
                roles[("linear", id(getattr(layer, n)))] = "qkv"
        roles[("linear", id(layer.o_proj))] = "attention"
        for n in ("gate_proj", "up_proj", "gate_up_proj", "down_proj"):
            if getattr(layer, n) is not None:
                roles[("linear", id(getattr(layer, n)))] = "mlp"
    return roles


class Timer:
    FLUSH_EVERY = 8192  # records (~1.5 MB of log)

    def __init__(self):
        self.phases: dict[str, float] = defaultdict(float)
        self.phase_calls: dict[str, int] = defaultdict(int)
        self.ops: dict[str, OpStat] = defaultdict(OpStat)
        self.roles: dict[str, OpStat] = defaultdict(OpStat)
        self.log: list[tuple] = []  # (op, key, shape, seconds) per op call of "full" steps (TimedOps)
        self.timed_ops: list[TimedOps] = []  # the proxies logging into this timer
        self.weight_roles: dict = {}  # (op name, id(weight)) -> role, from every wrapped model's weights
        self.tallies: dict = {}  # (op, id of key, shape) -> [op, role, bytes per call, FLOPs per call, calls, seconds]
        self.requests: list = []
        self.per_step: dict | None = None  # set to {} to count calls of one step (tests)
        self.wall_start = time.perf_counter()

    def wrap(self, ops, weights) -> TimedOps:
        return TimedOps(ops, self, weight_roles(weights))

    def tally_for(self, name: str, key, shape) -> list:
        """The tally of calls of one op with one weight and input shape (made, and costed, at first use)."""
        if name == "linear":
            wid = id(key[0])
        elif name == "take_rows":  # the embedding table, or the hidden states picked for the head
            wid = key if ("take_rows", key) in self.weight_roles else None
        elif name in _FIXED_ROLES:  # no weight: the key is a value (None, the cache's itemsize, shapes)
            wid = key
        else:
            wid = id(key)
        tally = self.tallies.get((name, wid, shape))
        if tally is None:
            role = _FIXED_ROLES.get(name) or self.weight_roles.get((name, wid), "logits")
            tally = self.tallies[(name, wid, shape)] = [name, role, *op_cost(name, key, shape), 0, 0.0]
        return tally

    def flush(self) -> None:
        """Fold the op calls logged and summed since the last flush into the tallies (report() and totals()
        call it; TimedOps every FLUSH_EVERY records)."""
        per_step = self.per_step
        attention = None
        for name, key, shape, seconds in self.log:
            if name == "attention":
                if attention is None or attention[0] is not key[3]:  # the same positions for every layer
                    attention = (key[3], op_cost(name, key, shape))
                nbytes, flops = attention[1]
                self.ops[name].add(seconds, nbytes, flops)
                self.roles[name].add(seconds, nbytes, flops)
                role = "attention"
            else:
                tally = self.tally_for(name, key, shape)
                tally[4] += 1
                tally[5] += seconds
                role = tally[1]
            if per_step is not None:
                per_step[(name, role)] = per_step.get((name, role), 0) + 1
        self.log.clear()
        for timed in self.timed_ops:
            timed.fold()

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
        self.flush()
        ops, roles = defaultdict(OpStat), defaultdict(OpStat)
        for target, source in ((ops, self.ops), (roles, self.roles)):
            for k, v in source.items():
                target[k].merge(v.calls, v.seconds, v.bytes, v.flops)
        for name, role, nbytes, flops, calls, seconds in self.tallies.values():
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
