"""Train tinyserve's small default model (a Llama-architecture model on TinyStories) from scratch.

    pip install -e ".[train,dev]"        # torch for training; transformers to save/load/sample
    python weights/train.py --out weights/tinystories

What it does, in order (weights/README.md has the numbers of the shipped run):

1. data: reads the TinyStories text (blocks separated by blank lines; each block is one "story" unit),
   keeps them in file order, the first 90% for training and the last 10% held out.
2. tokenizer: trains a SentencePiece-style BPE with the `tokenizers` library on the training stories only
   (Metaspace "▁", byte fallback with the 256 <0xNN> tokens, <unk>=0 <s>=1 </s>=2), like Llama 2's.
3. model: a transformers LlamaForCausalLM (grouped-query attention, tied embeddings), float32.
4. training: the training stories, each as BOS + story + EOS, concatenated in file order into one token
   stream; windows of --seq-len tokens are cut from it at a random offset per epoch and visited in a seeded
   random order; AdamW, linear warmup + cosine decay, gradient clipping, residual dropout.
5. reports train loss and held-out loss every --eval-every steps, then the held-out perplexity (see
   heldout_nll for exactly how it is computed) and three samples, generated with transformers from the
   saved directory after checking that the reloaded model gives the same logits.

Deterministic for a given --seed and --threads (torch on CPU; the data order comes from numpy's seeded
generator).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # single-threaded, deterministic BPE training

DEFAULT_DATA = "/work/shared/corpora/tinystories_val.txt"
BOS_ID, EOS_ID, UNK_ID = 1, 2, 0
SPECIALS = ["<unk>", "<s>", "</s>"]


# ----------------------------------------------------------------------------------------------- data
def read_stories(path: str) -> list[str]:
    """The corpus as a list of stories: the text between blank lines, stripped, empty ones dropped
    (the same split as tinyserve.validate.split_paragraphs, which `tinyserve perplexity` uses).

    Note: in tinystories_val.txt the blank lines separate paragraphs as well as stories, so a "story" here
    is one blank-line-separated block (usually one paragraph). Training keeps the file order, so the model
    still sees the paragraphs of a story one after the other (BOS p1 EOS BOS p2 EOS ...).
    """
    text = Path(path).read_text(encoding="utf-8")
    return [block.strip() for block in re.split(r"\n[ \t\r\f\v]*\n", text) if block.strip()]


def split_stories(stories: list[str], train_frac: float = 0.9) -> tuple[list[str], list[str]]:
    """First train_frac of the stories (file order) for training, the rest held out."""
    n_train = int(len(stories) * train_frac)
    return stories[:n_train], stories[n_train:]


# ------------------------------------------------------------------------------------------ tokenizer
def train_tokenizer(stories: list[str], vocab_size: int, min_char_count: int = 10):
    """A Llama-2-style BPE tokenizer trained on `stories` (a tokenizers.Tokenizer).

    ids: 0 <unk>, 1 <s>, 2 </s>, 3..258 the byte tokens <0x00>..<0xFF>, then the learned pieces.
    Characters seen fewer than min_char_count times in training are left out of the alphabet and are
    encoded as their UTF-8 bytes (byte fallback), as SentencePiece does.
    """
    from collections import Counter

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    def pre_tokenizer():
        # "▁" replaces spaces and is prepended to the first word only; words are split at "▁" so that
        # pieces never cross a word boundary (SentencePiece's split_by_whitespace).
        return pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)

    # The rare characters are removed from the text the BPE is learned from, so they never enter the
    # alphabet (done here rather than with the trainer's limit_alphabet, whose choice among characters of
    # equal count changes from run to run).
    chars = Counter()
    for s in stories:
        chars.update(s)
    rare = str.maketrans({c: None for c, n in chars.items() if n < min_char_count})

    draft = Tokenizer(models.BPE(unk_token="<unk>"))
    draft.pre_tokenizer = pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 256,  # the 256 byte tokens are added below
        special_tokens=SPECIALS,
        show_progress=False,
    )
    draft.train_from_iterator([s.translate(rare) for s in stories], trainer)
    learned = json.loads(draft.to_str())["model"]

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for tok, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        if tok not in vocab:
            vocab[tok] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizer()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    # Llama 2's decoder: "▁" -> " ", byte tokens -> bytes -> UTF-8, drop the first leading space.
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    assert [tok.token_to_id(t) for t in SPECIALS] == [0, 1, 2]
    return tok


def save_tokenizer(tok, out: Path, model_max_length: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ model
def make_config(args, vocab_size: int):
    from transformers import LlamaConfig

    assert args.dim % args.heads == 0 and args.heads % args.kv_heads == 0
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.dim // args.heads,
        max_position_embeddings=args.context,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        initializer_range=0.02,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        attention_bias=False,
        mlp_bias=False,
        use_cache=True,
    )


def add_residual_dropout(model, p: float) -> None:
    """Dropout on what each attention and MLP block adds to the residual stream (training only).

    Done with forward hooks so the saved model is a plain LlamaForCausalLM."""
    import torch.nn.functional as F

    if p <= 0:
        return

    def hook(module, inputs, output):
        if not module.training:
            return output
        if isinstance(output, tuple):
            return (F.dropout(output[0], p, True),) + tuple(output[1:])
        return F.dropout(output, p, True)

    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(hook)
        layer.mlp.register_forward_hook(hook)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied lm_head counted once


# ------------------------------------------------------------------------------------------- evaluation
def heldout_nll(model, sequences: list[list[int]], batch_size: int = 32) -> tuple[float, int]:
    """Sum of NLL (nats) and number of predicted tokens over `sequences`.

    Each sequence is [BOS] + the story's tokens (no EOS), already truncated to the context length; the
    model predicts every token after BOS from the tokens before it. Sequences are right-padded in
    batches: with a causal mask, padding after a sequence cannot change its logits, and padded positions
    are not counted.
    """
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = [sequences[i] for i in order[start : start + batch_size]]
            T = max(len(s) for s in batch)
            ids = torch.zeros(len(batch), T, dtype=torch.long)
            mask = torch.zeros(len(batch), T - 1, dtype=torch.bool)
            for b, s in enumerate(batch):
                ids[b, : len(s)] = torch.tensor(s)
                mask[b, : len(s) - 1] = True
            logits = model(input_ids=ids).logits[:, :-1].float()  # (B, T-1, V)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
            total += nll[mask.reshape(-1)].sum().item()
            count += int(mask.sum())
    model.train(was_training)
    return total, count


# ---------------------------------------------------------------------------------------------- training
def lr_at(step: int, args) -> float:
    """Linear warmup to --lr over --warmup steps, then cosine decay to --min-lr at --steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


def batches(stream, seq_len: int, batch_size: int, rng):
    """Endless (inputs, targets) batches of windows cut from the token stream.

    Each epoch: a random offset in [0, seq_len), then the non-overlapping windows of seq_len + 1 tokens
    from there, visited in a random order (the last partial batch of an epoch is dropped)."""
    import torch

    stream = torch.tensor(stream, dtype=torch.long)
    epoch = 0
    while True:
        offset = int(rng.integers(0, seq_len))
        n = (len(stream) - 1 - offset) // seq_len
        starts = offset + seq_len * rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            w = torch.stack([stream[s : s + seq_len + 1] for s in starts[i : i + batch_size]])
            yield epoch, w[:, :-1], w[:, 1:]
        epoch += 1


def param_groups(model, weight_decay: float):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fmt_time(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def save_model(model, tok, out: Path, args) -> None:
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True
    model.save_pretrained(out, safe_serialization=True)
    # Older readers (and tinyserve's config.py) look for these classic top-level names.
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["rope_theta"] = 10000.0
    cfg["torch_dtype"] = "float32"
    cfg.setdefault("dtype", "float32")
    cfg_path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, do_sample=False).save_pretrained(out)
    save_tokenizer(tok, out, args.context)


def check_and_sample(model, out: Path, held_batch, args) -> list[tuple[str, str]]:
    """Reload `out` with transformers, compare logits with the trained model, and generate the samples."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(out)
    hf_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    hf_model.eval()
    model.eval()
    with torch.no_grad():
        a = model(input_ids=held_batch).logits
        b = hf_model(input_ids=held_batch).logits
    diff = (a - b).abs().max().item()
    print(f"reloaded {out}: max |logits difference| vs trained model = {diff:.3g}")
    assert diff < 1e-4, diff

    prompt = "Once upon a time"
    ids = hf_tok(prompt, return_tensors="pt").input_ids
    assert ids[0, 0].item() == BOS_ID, "tokenizer must prepend BOS"
    samples = []
    settings = [("greedy", dict(do_sample=False), None)] + [
        (f"sampled: temperature 0.8, top_p 0.9, seed {s}", dict(do_sample=True, temperature=0.8, top_p=0.9, top_k=0), s)
        for s in args.sample_seeds
    ]
    for name, kw, seed in settings:
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            gen = hf_model.generate(ids, max_new_tokens=args.sample_tokens, eos_token_id=EOS_ID,
                                    pad_token_id=EOS_ID, **kw)
        text = hf_tok.decode(gen[0], skip_special_tokens=True)
        samples.append((name, text))
        print(f"--- sample ({name}):\n{text}\n", flush=True)
    return samples


def evaluate_saved(out: Path, held_stories: list[str], context: int) -> int:
    """Held-out perplexity of a saved model directory, with its own tokenizer (as in heldout_nll)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(out)
    hf_model = AutoModelForCausalLM.from_pretrained(out)
    held = [hf_tok(s).input_ids[:context] for s in held_stories]  # BOS + story, truncated
    assert all(s[0] == BOS_ID for s in held)
    tot, cnt = heldout_nll(hf_model, held)
    print(f"{out}: held-out mean NLL {tot / cnt:.4f} nats/token over {cnt} predicted tokens "
          f"({len(held)} stories) -> perplexity {math.exp(tot / cnt):.3f}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="TinyStories text, stories separated by blank lines")
    p.add_argument("--out", default="weights/tinystories", help="output model directory")
    p.add_argument("--vocab-size", type=int, default=2048, help="tokenizer vocabulary, 259 special/byte tokens included")
    p.add_argument("--dim", type=int, default=192, help="hidden_size")
    p.add_argument("--layers", type=int, default=5, help="num_hidden_layers")
    p.add_argument("--heads", type=int, default=6, help="query heads")
    p.add_argument("--kv-heads", type=int, default=3, help="key/value heads (grouped-query attention)")
    p.add_argument("--hidden", type=int, default=512, help="MLP intermediate_size")
    p.add_argument("--context", type=int, default=512, help="max_position_embeddings")
    p.add_argument("--seq-len", type=int, default=None, help="training window in tokens (None: --context)")
    p.add_argument("--batch", type=int, default=4, help="windows per step")
    p.add_argument("--steps", type=int, default=1400, help="optimizer steps")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=1e-4, help="learning rate at the last step")
    p.add_argument("--warmup", type=int, default=60, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay of the matrices")
    p.add_argument("--dropout", type=float, default=0.3, help="residual dropout while training")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping")
    p.add_argument("--eval-every", type=int, default=100, help="steps between loss reports")
    p.add_argument("--seed", type=int, default=1337, help="torch init, dropout and data order")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--sample-seeds", type=int, nargs="*", default=[1, 2], help="torch seeds of the sampled continuations")
    p.add_argument("--sample-tokens", type=int, default=120, help="max new tokens per sample")
    p.add_argument("--bench", type=int, default=0, help="only time this many training steps, save nothing")
    p.add_argument("--evaluate", action="store_true",
                   help="train nothing: load --out with transformers and print its held-out perplexity")
    args = p.parse_args(argv)
    args.seq_len = args.seq_len or args.context

    import numpy as np
    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import LlamaForCausalLM

    transformers.utils.logging.disable_progress_bar()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t_start = time.time()
    print("command: python " + " ".join(sys.argv), flush=True)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, seed {args.seed}", flush=True)

    # data and tokenizer
    stories = read_stories(args.data)
    train_stories, held_stories = split_stories(stories)
    if args.evaluate:
        return evaluate_saved(Path(args.out), held_stories, args.context)
    tok = train_tokenizer(train_stories, args.vocab_size)
    vocab_size = tok.get_vocab_size()
    stream = []
    for ids in (e.ids for e in tok.encode_batch(train_stories, add_special_tokens=False)):
        stream += [BOS_ID] + ids + [EOS_ID]
    held = [([BOS_ID] + e.ids)[: args.context] for e in tok.encode_batch(held_stories, add_special_tokens=False)]
    n_held_tokens = sum(len(s) - 1 for s in held)
    print(f"data: {len(stories)} stories, {len(train_stories)} train ({len(stream)} tokens with BOS/EOS), "
          f"{len(held_stories)} held out ({n_held_tokens} predicted tokens); vocab {vocab_size}", flush=True)

    # model
    config = make_config(args, vocab_size)
    model = LlamaForCausalLM(config)
    model.train()
    add_residual_dropout(model, args.dropout)
    n_params = count_params(model)
    print(f"model: dim {args.dim}, layers {args.layers}, heads {args.heads}/{args.kv_heads} kv, "
          f"hidden {args.hidden}, context {args.context}: {n_params:,} parameters", flush=True)
    tokens_per_step = args.batch * args.seq_len
    print(f"training: {args.steps} steps x {tokens_per_step} tokens = "
          f"{args.steps * tokens_per_step / len(stream):.1f} epochs", flush=True)

    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    data = batches(stream, args.seq_len, args.batch, rng)
    t_train = time.time()
    losses = []
    n_steps = args.bench or args.steps
    for step in range(n_steps):
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        epoch, x, y = next(data)
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip).item()
        opt.step()
        losses.append(loss.item())
        if args.bench:
            print(f"step {step}: loss {loss.item():.3f}  {time.time() - t_train:.1f}s", flush=True)
            continue
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            tot, cnt = heldout_nll(model, held)
            print(f"step {step + 1:5d}  epoch {epoch:2d}  lr {lr:.2e}  train loss {np.mean(losses):.4f}  "
                  f"held-out loss {tot / cnt:.4f}  |g| {gnorm:.2f}  {fmt_time(time.time() - t_train)}", flush=True)
            losses = []
    train_wall = time.time() - t_train
    if args.bench:
        print(f"bench: {train_wall / n_steps:.2f} s/step, {n_steps * tokens_per_step / train_wall:.0f} tokens/s")
        return 0

    tot, cnt = heldout_nll(model, held)
    print(f"training wall time {fmt_time(train_wall)} ({train_wall:.0f} s) with {args.threads} thread(s)")
    held_bytes = sum(len(tok.decode(s[1:]).encode("utf-8")) for s in held)
    print(f"held-out: mean NLL {tot / cnt:.4f} nats/token over {cnt} predicted tokens "
          f"({len(held)} stories) -> perplexity {math.exp(tot / cnt):.3f} "
          f"({tot / math.log(2) / held_bytes:.4f} bits per UTF-8 byte of the {held_bytes} bytes scored)", flush=True)

    out = Path(args.out)
    save_model(model, tok, out, args)
    sizes = {f.name: f.stat().st_size for f in sorted(out.iterdir())}
    print("saved " + ", ".join(f"{k} {v:,} B" for k, v in sizes.items()) + f"; total {sum(sizes.values()):,} B")
    check_and_sample(model, out, torch.tensor([held[-1]]), args)
    print(f"total wall time {fmt_time(time.time() - t_start)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
