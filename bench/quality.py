"""Quality of the quantized formats on a real model: perplexity and KL divergence from float32.

    python bench/quality.py [--backend cpu] [--paragraphs 200] > table.md

Converts ../shared/models/stories260K (llama2.c) with tinyserve, runs the float32 model over the first
`--paragraphs` paragraphs of ../shared/corpora/tinystories_val.txt (each BOS + text, truncated to 512
tokens) saving its logits, then every quantized format against that run (llama-perplexity's KL mode):
perplexity, mean / 99th-percentile / max KL (nats per token) and top-1 agreement with float32.
The table it prints is the one in docs/quality.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import tinyserve
from tinyserve.convert.llama2c import convert_llama2c
from tinyserve.validate import perplexity

SHARED = Path(__file__).resolve().parents[2] / "shared"
FORMATS = [(8, g, False) for g in (32, 64, 128, 256)] + [(4, g, zp) for zp in (False, True) for g in (32, 64, 128, 256)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--paragraphs", type=int, default=200)
    ap.add_argument("--shared", default=str(SHARED))
    args = ap.parse_args()
    shared = Path(args.shared)
    text = shared / "corpora" / "tinystories_val.txt"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = convert_llama2c(shared / "models/stories260K/stories260K.bin",
                                shared / "models/stories260K/tok512.model", tmp / "stories260K")
        base = tmp / "float.safetensors"
        f = perplexity(tinyserve.load(model, backend=args.backend), text, paragraphs=args.paragraphs,
                       save_logits=base)
        rows = [("float32", "-", f.perplexity, None)]
        for bits, g, zp in FORMATS:
            llm = tinyserve.load(model, backend=args.backend, quant=f"int{bits}", group_size=g, zero_point=zp)
            r = perplexity(llm, text, paragraphs=args.paragraphs, kl_base=base)
            rows.append((f"int{bits}" + ("-asym" if zp else ""), g, r.perplexity, r.kl))
            print(f"int{bits}{'-asym' if zp else ''} g{g}: ppl {r.perplexity:.4f}", file=sys.stderr)
    print(f"stories260K, {f.tokens} predicted tokens in {f.paragraphs} paragraphs, backend {args.backend}\n")
    print("| weights | group | perplexity | KL mean | KL p99 | KL max | top-1 agreement |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, g, ppl, kl in rows:
        if kl is None:
            print(f"| {name} | {g} | {ppl:.4f} | 0 | 0 | 0 | 1 |")
        else:
            print(f"| {name} | {g} | {ppl:.4f} | {kl['kl_mean']:.5f} | {kl['kl_p99']:.4f} | {kl['kl_max']:.3f} | "
                  f"{kl['top1']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
