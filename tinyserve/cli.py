"""The command line: argument parsing and printing only; every subcommand calls the library.

    tinyserve generate [--model DIR] [--prompt TEXT ...] ...
    tinyserve convert llama2c CHECKPOINT.bin --tokenizer TOKENIZER --out DIR
    tinyserve validate --model DIR [--kernel pkg.mod:fn --op NAME]   (docs/validation.md)
    tinyserve dump --model DIR --prompt TEXT --out FILE;  tinyserve compare A B
    tinyserve perplexity --model DIR --text FILE [--save-logits F | --kl-base F]

Errors the user can cause print one line on stderr and exit with status 2 (never a traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from .errors import TinyserveError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2 (argparse would print the whole usage too)
        raise TinyserveError(f"{self.prog}: {message}")


def _add_model_args(p, quant=True, kv=False):
    p.add_argument("--model", help="Hugging Face model directory (default: the model shipped in weights/)")
    p.add_argument("--backend", default=None, help="numpy (reference), cpu (Numba) or cuda (numba.cuda)")
    if quant:
        p.add_argument("--quant", default=None, choices=["none", "int8", "int4"], help="quantize weights while loading")
        p.add_argument("--group-size", type=int, default=128, help="quantization group size (32, 64, 128, 256)")
        p.add_argument("--zero-point", action="store_true", help="int4 with a zero point per group (asymmetric)")
    if kv:
        _add_kv_arg(p)


def _add_activations_arg(p):
    p.add_argument("--activations", default=None, choices=["float32", "int8"],
                   help="cpu backend, quantized weights: int8 rounds each layer's input to int8 per group in decode "
                        "(faster, a bounded error: docs/tolerances.md); default float32, or TINYSERVE_INT8_ACTIVATIONS=1")


@contextlib.contextmanager
def _activations(args):
    """The cpu backend's activation mode as --activations asks, for the command's duration."""
    mode = getattr(args, "activations", None)
    if mode is None:
        yield
        return
    from . import engine

    if mode == "int8" and any(b.strip() != "cpu" for b in (args.backend or engine.DEFAULT_BACKEND).split(",")):
        raise TinyserveError("--activations int8 is an option of the cpu backend (--backend cpu)")
    from .ops import cpu

    old = cpu.set_activations(mode)
    try:
        yield
    finally:
        cpu.set_activations(old)


def _add_kv_arg(p):
    from .kv_cache import KV_DTYPES

    p.add_argument("--kv-dtype", default="float32", choices=list(KV_DTYPES),
                   help="KV-cache element type (float16: half the memory and attention's reads; values rounded)")


def _load(args, progress=True, timer=None):
    from . import engine

    return engine.load(
        args.model,
        backend=args.backend or engine.DEFAULT_BACKEND,
        quant=getattr(args, "quant", None),
        group_size=getattr(args, "group_size", 128),
        zero_point=getattr(args, "zero_point", False),
        progress=progress,
        timer=timer,
        kv_dtype=getattr(args, "kv_dtype", "float32"),
    )


# --------------------------------------------------------------------------------------------- generate
def _read_prompt_file(path) -> list[dict]:
    """One prompt per line, or JSONL: one object per line with "prompt" and per-request parameters."""
    from .engine import SAMPLING_KEYS

    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
    except OSError as e:
        raise TinyserveError(f"cannot read prompt file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise TinyserveError(f"prompt file {path} is not UTF-8 text") from None
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise TinyserveError(f"prompt file {path} has no prompts")
    items = []
    for n, line in enumerate(lines, 1):
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TinyserveError(f"{path}:{n}: malformed JSON line ({e.msg})") from None
            except (ValueError, RecursionError):  # what json's parser refuses beyond syntax
                raise TinyserveError(f"{path}:{n}: malformed JSON line (number too long or nesting too deep)") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise TinyserveError(f'{path}:{n}: a JSON line needs a "prompt" string')
            unknown = set(obj) - {"prompt", "max_new_tokens", "stop", "seed", "chat", *SAMPLING_KEYS}
            if unknown:
                raise TinyserveError(f"{path}:{n}: unknown field(s) {', '.join(sorted(unknown))}")
            items.append(obj)
        else:
            items.append({"prompt": line})
    return items


def cmd_generate(args) -> int:
    from .engine import SAMPLING_KEYS

    if args.max_new_tokens < 0:
        raise TinyserveError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    items = [{"prompt": p} for p in (args.prompt or [])]
    if args.prompt_file:
        items += _read_prompt_file(args.prompt_file)
    if not items:
        items = [{"prompt": ""}]  # the empty prompt: BOS alone
    timer = None
    if args.profile:
        from .timer import Timer

        timer = Timer()
    llm = _load(args, timer=timer)
    common = dict(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed,
    )
    reqs = []
    for i, it in enumerate(items):
        sampling = {k: it.get(k, common[k]) for k in (*SAMPLING_KEYS, "seed")}
        reqs.append(
            llm.request(
                it["prompt"], it.get("max_new_tokens", args.max_new_tokens), it.get("stop", args.stop),
                it.get("chat", args.chat), id=i, **sampling,
            )
        )
    stream = len(reqs) == 1 and not args.json
    if stream:
        sys.stdout.write(items[0]["prompt"] if not args.chat else "")
        sys.stdout.flush()
    try:
        for ev in llm.stream(reqs, max_batch=args.max_batch, context=args.context):
            if stream and ev.text:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
    except (TinyserveError, MemoryError):
        if stream:  # end the echoed prompt's line: the error gets one of its own
            sys.stdout.write("\n")
        raise
    results = sorted(llm.last_generator.results(), key=lambda r: r.request_id)
    if stream:
        sys.stdout.write("\n")
    elif args.json:
        for r in results:
            d = r.to_dict()
            if timer is not None:
                d["profile"] = timer.report().as_dict()
            print(json.dumps(d, ensure_ascii=False))
    else:
        for r, it in zip(results, items):
            print(f"--- [{r.request_id}] {it['prompt']}{r.text}")
    if timer is not None and not args.json:
        print(timer.report().table())
    return 0


# ------------------------------------------------------------------------------------------------ bench
def _csv(value: str, what: str, cast=str) -> list:
    try:
        items = [cast(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError:
        raise TinyserveError(f"--{what}: cannot read {value!r}") from None
    if not items:
        raise TinyserveError(f"--{what} is empty")
    return items


def cmd_bench(args) -> int:
    from . import bench, engine

    backends = _csv(args.backend or engine.DEFAULT_BACKEND, "backend")
    quants = _csv(args.quant, "quant")
    for q in quants:
        if q not in ("none", "int8", "int4"):
            raise TinyserveError(f"--quant: unknown quantization {q!r} (none, int8, int4)")
    if args.plot and backends[0] == "cuda":
        raise TinyserveError("--plot draws the CPU's ceilings (RAM bandwidth, BLAS GFLOP/s): use it with a CPU backend")
    if args.plot:  # before the benchmark runs: matplotlib is there, the path names a format and can be written
        from .validate import check_out_file

        bench.pyplot()
        bench.plot_format(args.plot)
        check_out_file(args.plot)
    batches = _csv(args.batch, "batch", int)
    if any(b <= 0 for b in batches):
        raise TinyserveError("--batch sizes must be positive")
    for name, v in (("prompt-tokens", args.prompt_tokens), ("gen-tokens", args.gen_tokens),
                    ("repetitions", args.repetitions)):
        if v <= 0:
            raise TinyserveError(f"--{name} must be positive, got {v}")
    model = args.model
    if model is None and args.shape is None:
        model = str(engine.default_model_dir())
    report = bench.run_bench(model=model, shape=args.shape, backends=backends, quants=quants, batches=batches,
                             prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                             repetitions=args.repetitions, group_size=args.group_size, kv_dtype=args.kv_dtype,
                             depth=args.decode_depth)
    if args.plot:
        name, llm = bench.load_for_bench(model, args.shape, backends[0], quants[0], args.group_size,
                                         kv_dtype=args.kv_dtype)
        prof = bench.profile_ops(llm, name, batches[0], args.prompt_tokens, min(args.gen_tokens, 16),
                                 args.decode_depth)
        bw = max(report["bandwidth_gb_s"]) * 1e9
        bench.roofline_plot(args.plot, prof, bw, bench.measure_gflops(), title=f"{name} {backends[0]} {quants[0]}")
        report["roofline_plot"] = args.plot
    print(bench.dump_json(report) if args.json else bench.markdown_table(report))
    return 0


# --------------------------------------------------------------------------------------------- quantize
def cmd_quantize(args) -> int:
    from .convert.quantize import quantize_checkpoint
    from .progress import progress_bar

    out = quantize_checkpoint(args.model, args.out, args.bits, args.group_size, args.zero_point,
                              progress=progress_bar("quantizing"))
    print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------------------------------------- convert
def cmd_convert(args) -> int:
    if args.format == "llama2c":
        from .convert.llama2c import convert_llama2c

        out = convert_llama2c(args.checkpoint, args.tokenizer, args.out)
    else:
        from .convert.gguf import convert_gguf

        out = convert_gguf(args.checkpoint, args.out)
    print(f"wrote {out}")
    return 0


# ------------------------------------------------------------------- validate, dump, compare, perplexity
# (the library is tinyserve/validate.py and tinyserve/testing.py; docs/validation.md explains the figures)
def _print_report(rep, as_json) -> None:
    print(json.dumps(rep.to_dict(), default=float) if as_json else rep.table())


def cmd_validate(args) -> int:
    from . import engine
    from . import validate as v

    if bool(args.kernel) != bool(args.op):
        raise TinyserveError("--kernel and --op go together: --kernel package.module:function --op NAME")
    common = dict(backend=args.backend or engine.DEFAULT_BACKEND, quant=args.quant, group_size=args.group_size,
                  zero_point=args.zero_point)
    if args.kernel:
        from .testing import load_kernel

        if args.op not in v.OP_NAMES:
            raise TinyserveError(f"unknown op {args.op!r} (ops are: {', '.join(v.OP_NAMES)})")
        rep = v.validate_kernel(args.model, args.op, load_kernel(args.kernel), prompt=args.prompt, **common)
    else:
        rep = v.validate(args.model, prompt=args.prompt, dtype=args.dtype, **common)
    _print_report(rep, args.json)
    return 0 if rep.passed else 1


def cmd_dump(args) -> int:
    from . import engine
    from . import validate as v

    out = v.dump(args.model, args.prompt, args.out, backend=args.backend or engine.DEFAULT_BACKEND, quant=args.quant,
                 engine=args.engine, dtype=args.dtype, group_size=args.group_size, zero_point=args.zero_point)
    print(f"wrote {out}")
    return 0


def cmd_compare(args) -> int:
    from . import validate as v

    rep = v.compare_dumps(args.a, args.b)
    _print_report(rep, args.json)
    return 0 if rep.passed else 1


def cmd_perplexity(args) -> int:
    from . import engine
    from . import validate as v
    from .progress import progress_bar

    if args.save_logits:
        v.check_out_file(args.save_logits)  # before loading the model: a path that cannot be written fails at once
    llm = v.load_llm(args.model, args.backend or engine.DEFAULT_BACKEND, args.quant, args.group_size, args.zero_point,
                     kv_dtype=args.kv_dtype)
    res = v.perplexity(llm, args.text, context=args.context, paragraphs=args.paragraphs,
                       save_logits=args.save_logits, kl_base=args.kl_base, progress=progress_bar("perplexity"),
                       chunk=args.chunk)
    print(json.dumps(res.to_dict()) if args.json else res.table())
    return 0


def _add_validation_parsers(sub) -> None:
    from .ops import OP_NAMES

    v = sub.add_parser("validate", help="compare every layer with Hugging Face transformers (or check a kernel)")
    _add_model_args(v)
    v.add_argument("--prompt", default=None, help="text to run (default: a short story opening)")
    v.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="transformers' dtype")
    v.add_argument("--kernel", help="package.module:function to swap in for --op (checked against the reference)")
    v.add_argument("--op", help="the op the kernel replaces: " + ", ".join(OP_NAMES))
    v.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    v.set_defaults(func=cmd_validate)

    d = sub.add_parser("dump", help="write every layer's hidden states and the logits (golden activations)")
    _add_model_args(d)
    d.add_argument("--prompt", required=True)
    d.add_argument("--out", required=True, help="FILE.safetensors")
    d.add_argument("--engine", default="tinyserve", choices=["tinyserve", "transformers"])
    d.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="transformers' dtype")
    d.set_defaults(func=cmd_dump)

    c = sub.add_parser("compare", help="the per-layer report of dump B against dump A")
    c.add_argument("a", help="the reference dump")
    c.add_argument("b", help="the dump to check")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_compare)

    p = sub.add_parser("perplexity", help="perplexity over a text's paragraphs; KL against a saved base run")
    _add_model_args(p, kv=True)
    p.add_argument("--text", required=True, help="UTF-8 text; paragraphs separated by blank lines")
    p.add_argument("--context", type=int, default=None, help="tokens per paragraph (default min(model, 512))")
    p.add_argument("--paragraphs", type=int, default=None, help="only the first N paragraphs")
    p.add_argument("--chunk", type=int, default=None,
                   help="tokens per forward step (1: every token a decode step, as generation runs them); "
                        "default: each paragraph in one prefill")
    _add_activations_arg(p)
    p.add_argument("--save-logits", help="write the logits (safetensors) for a later --kl-base run")
    p.add_argument("--kl-base", help="logits saved by a base run: report KL divergence and top-1 agreement")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_perplexity)


# ------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tinyserve", description="A small, exact, readable inference engine for Llama-family models.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    g = sub.add_parser("generate", help="generate text from prompts")
    _add_model_args(g, kv=True)
    _add_activations_arg(g)
    g.add_argument("--prompt", action="append", help="a prompt (repeat for several; empty: BOS alone)")
    g.add_argument("--prompt-file", help="one prompt per line, or JSONL with per-request parameters")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: generation_config.json)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop when this text appears (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    g.add_argument("--max-batch", type=int, default=None, help="sequences decoded together (continuous batching)")
    g.add_argument("--context", type=int, default=None, help="KV-cache length per sequence")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")
    g.add_argument("--profile", action="store_true", help="print where the time and bytes went (instrumented timer)")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="measure prefill and decode speed against the machine's bandwidth")
    src = b.add_mutually_exclusive_group()
    src.add_argument("--model", help="Hugging Face model directory (default: the shipped model)")
    src.add_argument("--shape", help="random weights of a named shape: stories15M, stories110M, llama-1b, stories260K")
    b.add_argument("--backend", default=None, help="comma-separated backends (default: the default backend)")
    b.add_argument("--quant", default="none", help="comma-separated: none,int8,int4")
    b.add_argument("--group-size", type=int, default=128)
    _add_kv_arg(b)
    _add_activations_arg(b)
    b.add_argument("--batch", default="1", help="comma-separated batch sizes, e.g. 1,8,16 (their repetitions take "
                   "turns; with 1 among them, each is also reported as a multiple of batch 1's decode rate)")
    b.add_argument("--prompt-tokens", type=int, default=512)
    b.add_argument("--gen-tokens", type=int, default=128)
    b.add_argument("--decode-depth", type=int, default=None, metavar="N",
                   help="decode from position N, attending to the prompt's first N tokens (0: an empty context, "
                   "as llama-bench's tg tests; default: the whole prompt); at most --prompt-tokens")
    b.add_argument("--repetitions", type=int, default=3)
    b.add_argument("--json", action="store_true", help="machine-readable results")
    b.add_argument("--plot", help="write a roofline picture of the ops of the first configuration to this file "
                   "(.png, .pdf or .svg; needs matplotlib: pip install 'tinyserve[plot]')")
    b.set_defaults(func=cmd_bench)

    qz = sub.add_parser("quantize", help="write an int8 / int4 quantized checkpoint")
    qz.add_argument("--model", required=True, help="Hugging Face model directory (float weights)")
    qz.add_argument("--bits", type=int, required=True, choices=[8, 4])
    qz.add_argument("--group-size", type=int, default=128, help="32, 64, 128 or 256")
    qz.add_argument("--zero-point", action="store_true", help="int4 with a zero point per group")
    qz.add_argument("--out", required=True)
    qz.set_defaults(func=cmd_quantize)

    c = sub.add_parser("convert", help="import a llama2.c or GGUF checkpoint as a Hugging Face directory")
    c.add_argument("format", choices=["llama2c", "gguf"])
    c.add_argument("checkpoint")
    c.add_argument("--tokenizer", help="llama2c: SentencePiece .model or llama2.c tokenizer.bin")
    c.add_argument("--out", required=True)
    c.set_defaults(func=cmd_convert)
    _add_validation_parsers(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        with _activations(args):
            return args.func(args)
    except TinyserveError as e:
        print(f"tinyserve: error: {e}", file=sys.stderr)
        return 2
    except MemoryError:
        print("tinyserve: error: out of memory (model or context too large for this machine)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tinyserve: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
