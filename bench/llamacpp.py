"""tinyserve against llama.cpp on this machine: decode tokens/s at batch 1 on the Llama-3.2-1B shape (or another
of tinyserve bench's shapes, --shape), both as fractions of the read bandwidth measured in the same run.

    python bench/llamacpp.py --llama-bench PATH/llama-bench --llama-quantize PATH/llama-quantize [--dir DIR]
    python bench/llamacpp.py ... --alternate 6     # tokens/s side by side, in alternating pairs

llama.cpp is not a dependency: build its llama-bench and llama-quantize yourself (docs/performance.md,
"Sixth session", says how it was done here without internet: the copy vendored in the llama-cpp-python
source package on PyPI). The script writes a random-weight GGUF of the shape in float32 (the `gguf`
package; a placeholder vocabulary of the shape's size), quantizes it to Q8_0 and Q4_0 with `llama-quantize
--pure` (every matrix, the tied head too, as tinyserve quantizes them), then runs, for `--rounds` rounds:
the bandwidth pass, `llama-bench -p 0 -n 32 -t THREADS -r 3` on each file, `tinyserve bench --shape SHAPE
--decode-depth 0` (decode from an empty context, as llama-bench's tg test)
for none,int8,int4 with float activations, then with int8 activations (TINYSERVE_INT8_ACTIVATIONS=1,
llama.cpp's way). Each floor fraction is tokens/s times bytes per token (llama.cpp: its file's tensor bytes;
tinyserve: bench's weight bytes per token) over the better of two read passes taken right before and right
after that run, as tinyserve bench holds its decode steps (its own passes). The GGUF files (~7 GB for the 1B
shape) stay in --dir for later runs.

`--alternate N` compares tokens/s directly instead, which holds whatever the machine's memory does: for each
format (and each of tinyserve's activation modes) one process loads the tinyserve model once, then N times
runs `llama-bench -r 1 -n 32` on the file and right after it 32 tinyserve decode steps from an empty context,
each between read passes; it prints each pair and the median of tinyserve's tok/s over llama.cpp's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinyserve.bench import SHAPES, bandwidth_meter, random_weights, shape_config  # noqa: E402

FORMATS = {"f32": "none", "Q8_0": "int8", "Q4_0": "int4"}  # llama.cpp file type -> tinyserve --quant


def write_f32_gguf(path: Path, shape: str = "llama-1b") -> None:
    """The random weights of a tinyserve bench shape (model.py names), as a llama.cpp GGUF in float32.

    q and k are written as they are, without the row permutation that llama.cpp's converter applies for its
    RoPE layout: llama.cpp computes another (equally random) model, at the same cost, which is all a timing
    needs. Not a way to move real weights between the two engines."""
    import gguf

    cfg = shape_config(shape)
    w = random_weights(cfg)
    out = gguf.GGUFWriter(str(path), "llama")
    out.add_context_length(2048)
    out.add_embedding_length(cfg.hidden_size)
    out.add_block_count(cfg.num_hidden_layers)
    out.add_feed_forward_length(cfg.intermediate_size)
    out.add_head_count(cfg.num_attention_heads)
    out.add_head_count_kv(cfg.num_key_value_heads)
    out.add_rope_dimension_count(cfg.head_dim)
    out.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    out.add_rope_freq_base(cfg.rope_theta)
    out.add_file_type(0)
    special = ["<unk>", "<s>", "</s>"]
    tokens = special + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"t{i}" for i in range(cfg.vocab_size - len(tokens))]
    out.add_tokenizer_model("llama")
    out.add_token_list(tokens)
    out.add_token_scores([0.0] * len(tokens))
    out.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259))
    out.add_bos_token_id(1)
    out.add_eos_token_id(2)
    out.add_tensor("token_embd.weight", w.embed_tokens)
    out.add_tensor("output_norm.weight", w.norm)
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for i, layer in enumerate(w.layers):
        out.add_tensor(f"blk.{i}.attn_norm.weight", layer.input_layernorm)
        out.add_tensor(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm)
        for ours, theirs in names.items():
            out.add_tensor(f"blk.{i}.{theirs}.weight", getattr(layer, ours))
    out.write_header_to_file()
    out.write_kv_data_to_file()
    out.write_tensors_to_file()
    out.close()


def tensor_bytes(path: Path) -> int:
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)


def llama_bench(binary: str, path: Path, threads: int, repetitions: int = 3) -> float:
    out = subprocess.run([binary, "-m", str(path), "-p", "0", "-n", "32", "-t", str(threads), "-r", str(repetitions),
                          "-o", "json"],
                         capture_output=True, text=True, check=True).stdout
    return float(json.loads(out)[0]["avg_ts"])


def tinyserve_bench(int8_activations: bool, shape: str) -> dict:
    env = {**os.environ, "TINYSERVE_INT8_ACTIVATIONS": "1" if int8_activations else "0"}
    quants = "int8,int4" if int8_activations else "none,int8,int4"
    out = subprocess.run([sys.executable, "-m", "tinyserve", "bench", "--shape", shape, "--quant", quants,
                          "--batch", "1", "--prompt-tokens", "16", "--gen-tokens", "24", "--decode-depth", "0",
                          "--repetitions", "1", "--json"], capture_output=True, text=True, check=True, env=env).stdout
    return {c["quant"]: c for c in json.loads(out)["results"]}


def alternate_worker(binary: str, path: Path, shape: str, quant: str, pairs: int, threads: int, nbytes: int) -> None:
    """One format: the tinyserve model loaded once, then `pairs` times llama-bench and tinyserve's decode steps,
    each between read passes; a JSON line per pair on stdout."""
    from tinyserve.bench import load_for_bench, measure_once, weight_bytes_per_step

    _, llm = load_for_bench(None, shape, "cpu", quant)
    ours_bytes = weight_bytes_per_step(llm.weights)
    meter = bandwidth_meter("cpu")
    measure_once(llm, 1, 16, 4, 64, depth=0)  # warm: the kernels and the weights' pages
    for _ in range(pairs):
        before = meter()
        theirs = llama_bench(binary, path, threads, repetitions=1)
        mid = meter()
        _, ours, after = measure_once(llm, 1, 16, 32, 64, bandwidth=meter, depth=0)
        print(json.dumps({"llama_tok_s": theirs, "llama_fraction": theirs * nbytes / max(before, mid),
                          "ours_tok_s": ours, "ours_fraction": ours * ours_bytes / after,
                          "gb_s": [before / 1e9, mid / 1e9, after / 1e9]}), flush=True)


def alternate(args, files: dict, nbytes: dict) -> None:
    print("| format | tinyserve activations | pairs | llama.cpp tok/s | tinyserve tok/s | tinyserve / llama.cpp "
          "(median [min, max]) | llama.cpp floor fraction | tinyserve floor fraction | GB/s (min-max) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    pairs = []
    for q, quant in FORMATS.items():
        for a8 in ((False, True) if quant != "none" else (False,)):
            env = {**os.environ, "TINYSERVE_INT8_ACTIVATIONS": "1" if a8 else "0"}
            out = subprocess.run([sys.executable, __file__, "--llama-bench", args.llama_bench, "--llama-quantize",
                                  args.llama_quantize, "--threads", str(args.threads), "--worker", q, "--shape", args.shape,
                                  "--alternate", str(args.alternate), "--dir", args.dir],
                                 capture_output=True, text=True, check=True, env=env).stdout
            rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            pairs += [(q, a8, r) for r in rows]
            ratio = [r["ours_tok_s"] / r["llama_tok_s"] for r in rows]
            gb = [g for r in rows for g in r["gb_s"]]

            def med(k):
                return float(np.median([r[k] for r in rows]))

            print(f"| {q} | {'int8' if a8 else 'float32'} | {len(rows)} | {med('llama_tok_s'):.2f} | "
                  f"{med('ours_tok_s'):.2f} | {np.median(ratio):.3f} [{min(ratio):.3f}, {max(ratio):.3f}] | "
                  f"{med('llama_fraction'):.2f} | {med('ours_fraction'):.2f} | {min(gb):.1f}-{max(gb):.1f} |",
                  flush=True)
    print("\nEach pair, in the order run (GB/s: the passes before llama.cpp, between the two, and the better of "
          "tinyserve bench's two around its steps):\n")
    print("| format | tinyserve activations | llama.cpp tok/s | tinyserve tok/s | ratio | GB/s |")
    print("|---|---|---:|---:|---:|---|")
    for q, a8, r in pairs:
        print(f"| {q} | {'int8' if a8 else 'float32'} | {r['llama_tok_s']:.2f} | {r['ours_tok_s']:.2f} | "
              f"{r['ours_tok_s'] / r['llama_tok_s']:.3f} | {' / '.join(f'{g:.1f}' for g in r['gb_s'])} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--llama-quantize", required=True)
    ap.add_argument("--dir", default="llamacpp-models")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shape", default="llama-1b", choices=list(SHAPES), help="tinyserve bench's model shape")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--alternate", type=int, default=0, metavar="N",
                    help="instead of rounds: N alternating pairs of llama.cpp and tinyserve runs per format")
    ap.add_argument("--worker", choices=list(FORMATS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    try:
        return run(args)
    except subprocess.CalledProcessError as e:  # one line, not a traceback
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        last = err.strip().splitlines()[-1:]
        print(f"error: {' '.join(map(str, e.cmd[:4]))} ... exited with {e.returncode}"
              f"{': ' + last[0] if last else ''}", file=sys.stderr)
        return 2


def run(args) -> int:
    for binary in (args.llama_bench, args.llama_quantize):
        if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
            print(f"error: {binary} is not an executable file (build llama.cpp first, see the docstring)",
                  file=sys.stderr)
            return 2
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    files = {q: d / f"{args.shape}-{q}.gguf" for q in FORMATS}
    if not files["f32"].exists():
        write_f32_gguf(files["f32"], args.shape)
    for q in ("Q8_0", "Q4_0"):
        if not files[q].exists():
            subprocess.run([args.llama_quantize, "--pure", str(files["f32"]), str(files[q]), q, str(args.threads)],
                           capture_output=True, check=True)
    if args.worker:  # one format's pairs (alternate() starts one such process per format and activation mode)
        path = files[args.worker]
        alternate_worker(args.llama_bench, path, args.shape, FORMATS[args.worker], args.alternate, args.threads,
                         tensor_bytes(path))
        return 0
    nbytes = {q: tensor_bytes(p) for q, p in files.items()}
    v = subprocess.run([args.llama_bench, "--version"], capture_output=True, text=True)
    version = " ".join((v.stdout + v.stderr).split())
    print(f"llama.cpp: {version}; {args.threads} threads")
    if args.alternate:
        alternate(args, files, nbytes)
        return 0
    print("Each figure is held against read passes taken right before and right after that one run (this machine's "
          "bandwidth can change from one minute to the next); tinyserve's are bench's own, around its decode steps.")
    print("| round | format | llama.cpp tok/s | GB/s around it | floor fraction | tinyserve tok/s | GB/s | floor fraction "
          "| tinyserve, int8 activations | GB/s | floor fraction |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    meter = bandwidth_meter("cpu")  # its buffer allocated once
    for r in range(args.rounds):
        theirs = {}
        for q, p in files.items():
            before = meter()
            tok_s = llama_bench(args.llama_bench, p, args.threads)
            theirs[q] = (tok_s, max(before, meter()))  # as bench's: the better pass around it
        ours, ours_a8 = tinyserve_bench(False, args.shape), tinyserve_bench(True, args.shape)

        def cells(c):
            if not c:
                return " |  | "
            return f"{c['decode_tok_s']:.1f} | {c['bandwidth_gb_s']:.1f} | {c['floor_fraction']:.2f}"

        for q, quant in FORMATS.items():
            tok_s, bw = theirs[q]
            print(f"| {r + 1} | {q} | {tok_s:.2f} | {bw / 1e9:.1f} | {tok_s * nbytes[q] / bw:.2f} | "
                  f"{cells(ours[quant])} | {cells(ours_a8.get(quant))} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
