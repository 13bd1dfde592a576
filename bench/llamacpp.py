"""tinyserve against llama.cpp on this machine: decode tokens/s at batch 1 on the Llama-3.2-1B shape, both as
fractions of the read bandwidth measured in the same run.

    python bench/llamacpp.py --llama-bench PATH/llama-bench --llama-quantize PATH/llama-quantize [--dir DIR]

llama.cpp is not a dependency: build its llama-bench and llama-quantize yourself (docs/performance.md,
"Sixth session", says how it was done here without internet: the copy vendored in the llama-cpp-python
source package on PyPI). The script writes a random-weight GGUF of the 1B shape in float32 (the `gguf`
package; a placeholder vocabulary of 128256 tokens), quantizes it to Q8_0 and Q4_0 with `llama-quantize
--pure` (every matrix, the tied head too, as tinyserve quantizes them), then runs, for `--rounds` rounds:
the bandwidth pass, `llama-bench -p 0 -n 32 -t THREADS -r 3` on each file, `tinyserve bench --shape llama-1b
--decode-depth 0` (decode from an empty context, as llama-bench's tg test)
for none,int8,int4 with float activations, then with int8 activations (TINYSERVE_INT8_ACTIVATIONS=1,
llama.cpp's way). Each floor fraction is tokens/s times bytes per token (llama.cpp: its file's tensor bytes;
tinyserve: bench's weight bytes per token) over the mean of the bandwidth measured before and after the
round. The GGUF files (~7 GB) stay in --dir for later runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinyserve.bench import measure_bandwidth, random_weights, shape_config  # noqa: E402

FORMATS = {"f32": "none", "Q8_0": "int8", "Q4_0": "int4"}  # llama.cpp file type -> tinyserve --quant


def write_f32_gguf(path: Path) -> None:
    """The random llama-1b weights of tinyserve bench (model.py names), as a llama.cpp GGUF in float32.

    q and k are written as they are, without the row permutation that llama.cpp's converter applies for its
    RoPE layout: llama.cpp computes another (equally random) model, at the same cost, which is all a timing
    needs. Not a way to move real weights between the two engines."""
    import gguf

    cfg = shape_config("llama-1b")
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


def llama_bench(binary: str, path: Path, threads: int) -> float:
    out = subprocess.run([binary, "-m", str(path), "-p", "0", "-n", "32", "-t", str(threads), "-r", "3", "-o", "json"],
                         capture_output=True, text=True, check=True).stdout
    return float(json.loads(out)[0]["avg_ts"])


def tinyserve_bench(int8_activations: bool) -> dict:
    env = {**os.environ, "TINYSERVE_INT8_ACTIVATIONS": "1" if int8_activations else "0"}
    quants = "int8,int4" if int8_activations else "none,int8,int4"
    out = subprocess.run([sys.executable, "-m", "tinyserve", "bench", "--shape", "llama-1b", "--quant", quants,
                          "--batch", "1", "--prompt-tokens", "16", "--gen-tokens", "24", "--decode-depth", "0",
                          "--repetitions", "1", "--json"], capture_output=True, text=True, check=True, env=env).stdout
    return {c["quant"]: c for c in json.loads(out)["results"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--llama-quantize", required=True)
    ap.add_argument("--dir", default="llamacpp-models")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    for binary in (args.llama_bench, args.llama_quantize):
        if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
            print(f"error: {binary} is not an executable file (build llama.cpp first, see the docstring)",
                  file=sys.stderr)
            return 2
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    files = {q: d / f"llama-1b-{q}.gguf" for q in FORMATS}
    if not files["f32"].exists():
        write_f32_gguf(files["f32"])
    for q in ("Q8_0", "Q4_0"):
        if not files[q].exists():
            subprocess.run([args.llama_quantize, "--pure", str(files["f32"]), str(files[q]), q, str(args.threads)],
                           capture_output=True, check=True)
    nbytes = {q: tensor_bytes(p) for q, p in files.items()}
    v = subprocess.run([args.llama_bench, "--version"], capture_output=True, text=True)
    version = " ".join((v.stdout + v.stderr).split())
    print(f"llama.cpp: {version}; {args.threads} threads")
    print("| round | format | bandwidth GB/s | llama.cpp tok/s | floor fraction | tinyserve tok/s | floor fraction "
          "| tinyserve, int8 activations | floor fraction |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in range(args.rounds):
        before = measure_bandwidth()
        theirs = {q: llama_bench(args.llama_bench, p, args.threads) for q, p in files.items()}
        ours, ours_a8 = tinyserve_bench(False), tinyserve_bench(True)
        bw = (before + measure_bandwidth()) / 2  # every fraction of the round against the same bandwidth

        def cells(c):
            return f"{c['decode_tok_s']:.1f} | {c['decode_tok_s'] * c['weight_bytes_per_token'] / bw:.2f}" if c else " | "

        for q, quant in FORMATS.items():
            print(f"| {r + 1} | {q} | {bw / 1e9:.1f} | {theirs[q]:.2f} | {theirs[q] * nbytes[q] / bw:.2f} | "
                  f"{cells(ours[quant])} | {cells(ours_a8.get(quant))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
