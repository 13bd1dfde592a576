"""The command line: argument parsing and printing only; every subcommand calls the library.

    tinyserve generate [--model DIR] [--prompt TEXT ...] ...
    tinyserve convert llama2c CHECKPOINT.bin --tokenizer TOKENIZER --out DIR

Errors the user can cause print one line on stderr and exit with status 2 (never a traceback).
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import TinyserveError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2 (argparse would print the whole usage too)
        raise TinyserveError(f"{self.prog}: {message}")


def _add_model_args(p, quant=True):
    p.add_argument("--model", help="Hugging Face model directory (default: the model shipped in weights/)")
    p.add_argument("--backend", default=None, help="numpy (reference), cpu (Numba) or cuda (numba.cuda)")
    if quant:
        p.add_argument("--quant", default=None, choices=["none", "int8", "int4"], help="quantize weights while loading")
        p.add_argument("--group-size", type=int, default=128, help="quantization group size (32, 64, 128, 256)")
        p.add_argument("--zero-point", action="store_true", help="int4 with a zero point per group (asymmetric)")


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
    )


# --------------------------------------------------------------------------------------------- generate
def _read_prompt_file(path) -> list[dict]:
    """One prompt per line, or JSONL: one object per line with "prompt" and per-request parameters."""
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
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise TinyserveError(f'{path}:{n}: a JSON line needs a "prompt" string')
            unknown = set(obj) - {"prompt", "max_new_tokens", "stop", "seed", "chat",
                                  "temperature", "top_k", "top_p", "min_p", "repetition_penalty"}
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
    for ev in llm.stream(reqs, max_batch=args.max_batch, context=args.context):
        if stream and ev.text:
            sys.stdout.write(ev.text)
            sys.stdout.flush()
    results = sorted(llm.last_generator.results(), key=lambda r: r.request_id)
    if stream:
        sys.stdout.write("\n")
    elif args.json:
        for r in results:
            d = _result_dict(r)
            if timer is not None:
                d["profile"] = timer.report().as_dict()
            print(json.dumps(d, ensure_ascii=False))
    else:
        for r, it in zip(results, items):
            print(f"--- [{r.request_id}] {it['prompt']}{r.text}")
    if timer is not None and not args.json:
        print(timer.report().table())
    return 0


def _result_dict(r) -> dict:
    n = len(r.token_ids)
    return {
        "id": r.request_id,
        "text": r.text,
        "token_ids": r.token_ids,
        "finish_reason": r.finish_reason,
        "prompt_tokens": r.prompt_tokens,
        "generated_tokens": n,
        "seconds": round(r.seconds, 6),
        "ttft_s": None if r.ttft is None else round(r.ttft, 6),
        "tokens_per_s": round(n / r.seconds, 3) if r.seconds > 0 else None,
    }


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
                             repetitions=args.repetitions, group_size=args.group_size)
    if args.plot:
        name, llm = bench.load_for_bench(model, args.shape, backends[0], quants[0], args.group_size)
        prof = bench.profile_ops(llm, name, batches[0], args.prompt_tokens, min(args.gen_tokens, 16))
        bw = max(report["bandwidth_gb_s"]) * 1e9
        bench.roofline_plot(args.plot, prof, bw, bench.measure_gflops(), title=f"{name} {backends[0]} {quants[0]}")
        report["roofline_plot"] = args.plot
    print(bench.dump_json(report) if args.json else bench.markdown_table(report))
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


# ------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tinyserve", description="A small, exact, readable inference engine for Llama-family models.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    g = sub.add_parser("generate", help="generate text from prompts")
    _add_model_args(g)
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
    b.add_argument("--batch", default="1", help="comma-separated batch sizes, e.g. 1,8,16")
    b.add_argument("--prompt-tokens", type=int, default=512)
    b.add_argument("--gen-tokens", type=int, default=128)
    b.add_argument("--repetitions", type=int, default=3)
    b.add_argument("--json", action="store_true", help="machine-readable results")
    b.add_argument("--plot", help="write a roofline picture (PNG) of the ops of the first configuration")
    b.set_defaults(func=cmd_bench)

    c = sub.add_parser("convert", help="import a llama2.c or GGUF checkpoint as a Hugging Face directory")
    c.add_argument("format", choices=["llama2c", "gguf"])
    c.add_argument("checkpoint")
    c.add_argument("--tokenizer", help="llama2c: SentencePiece .model or llama2.c tokenizer.bin")
    c.add_argument("--out", required=True)
    c.set_defaults(func=cmd_convert)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
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
