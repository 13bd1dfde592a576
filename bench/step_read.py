"""How fast can a decode step's weights be read, one call per matrix? A ceiling for the kernels.

    python bench/step_read.py [--shape llama-1b] [--quant int4] [--position 512] [--steps 8]

`tinyserve bench` reports decode as a fraction of the floor: weight bytes per token over the read bandwidth
of one long pass over a 512 MiB buffer. A decode step cannot stream like that: it reads ~7 matrices per layer
in separate calls (2-130 MB each on the 1B shape), with small ops between them. This script reads the
model's own weight arrays (the largest array of each matrix: its values, without the scales) in the order
of a decode step with the same read kernel as the bandwidth pass, one parallel call per matrix and nothing
else, and alternates that with real decode steps of the model (steps of the two take turns, so both see
the same minutes of a shared machine). It prints:

- step-order read: the matrices' bytes / the time to read them that way, and that as a fraction of the
  bandwidth pass (what a perfect kernel, one call per matrix, would reach before any compute);
- decode: the step's time against the step-order read (how close the kernels and the rest of the step come
  to that ceiling).

Options such as TINYSERVE_INT8_ACTIVATIONS and TINYSERVE_HUGE_PAGES apply (set them in the environment).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from tinyserve.bench import _linear_weights, load_for_bench, measure_bandwidth, read_kernel


def largest_array(m) -> np.ndarray:
    """The largest array a linear weight holds (float32 values, quantized data or packed blocks), as float32
    words (the read kernel's element type; a trailing partial word is left out)."""
    m = getattr(m, "weight", m)  # ops.Stacked
    arrays = [m] if isinstance(m, np.ndarray) else [getattr(m, k) for k in ("blocks", "data") if hasattr(m, k)]
    a = np.ascontiguousarray(max(arrays, key=lambda a: a.nbytes)).reshape(-1).view(np.uint8)
    return a[: a.size // 4 * 4].view(np.float32)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama-1b")
    p.add_argument("--quant", default="int4")
    p.add_argument("--position", type=int, default=512, help="decode from this position (a prompt of this many tokens)")
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    name, llm = load_for_bench(None, args.shape, "cpu", args.quant)
    w = llm.weights
    order = [largest_array(m) for layer in w.layers for m in _linear_weights(layer)] + [largest_array(w.lm_head)]
    nbytes = sum(a.nbytes for a in order)
    read = read_kernel()

    def read_step():
        for a in order:
            read(a, 2)

    read_step()
    cache = llm.new_cache(1, args.position + args.steps + 1)
    ids = np.arange(3, 3 + args.position) % llm.config.vocab_size
    llm.forward(ids, np.arange(args.position), np.zeros(args.position, np.int64), cache, rows=[args.position - 1])
    token = np.array([5])
    bandwidth = [measure_bandwidth() / 1e9]
    reads, steps = [], []
    for t in range(args.steps):
        t0 = time.perf_counter()
        read_step()
        t1 = time.perf_counter()
        llm.forward(token, [args.position + t], [0], cache, phase="decode")
        steps.append(time.perf_counter() - t1)
        reads.append(t1 - t0)
    bandwidth.append(measure_bandwidth() / 1e9)
    r, d, bw = float(np.median(reads)), float(np.median(steps)), float(np.mean(bandwidth))
    print(f"{name} {args.quant}: {len(order)} matrices, {nbytes / 1e6:.0f} MB; bandwidth pass {bandwidth[0]:.1f} / "
          f"{bandwidth[1]:.1f} GB/s; step-order read {1e3 * r:.1f} ms = {nbytes / r / 1e9:.1f} GB/s "
          f"({nbytes / r / 1e9 / bw:.2f} of the pass); decode step {1e3 * d:.1f} ms, step-order read / step "
          f"{r / d:.2f} (medians of {args.steps})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
