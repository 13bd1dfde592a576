"""Text <-> token ids, with the model's own files and Hugging Face's `tokenizers` library.

- tokenizer.json holds the vocabulary, merges, normalization and decoding rules, and the post-processor that
  adds BOS (Llama 1/2/3, Mistral) or nothing (Qwen2) when `add_special_tokens` is on.
- tokenizer_config.json (optional) gives the special tokens by name and the chat template (Jinja).
- config.json and generation_config.json give BOS/EOS ids; a model may have several EOS ids (Llama 3
  instruct stops on <|eot_id|> and <|end_of_text|>): generation stops on any of them.

Streaming: `StreamDecoder` turns tokens into text one at a time without ever emitting half of a multi-byte
UTF-8 character (byte-fallback tokens like <0xE2> come in pieces) and without losing the spaces that
SentencePiece-style decoders strip from the first token of a decode call.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from .config import ModelConfig, read_json, token_ids
from .errors import TinyserveError


def _token_content(tc: dict, key: str, path: Path) -> str | None:
    """tokenizer_config.json gives special tokens as strings or as {"content": ...} objects (or null)."""
    t = tc.get(key)
    text = t.get("content") if isinstance(t, dict) else t
    if text is not None and not isinstance(text, str):
        raise TinyserveError(f'{path}: {key} must be a string or an object with a "content" string, got {t!r}')
    return text


def _read_json(path: Path) -> dict:
    d = read_json(path, "cannot read as JSON")
    if not isinstance(d, dict):
        raise TinyserveError(f"{path}: expected a JSON object")
    return d


def _chat_template(value, path: Path) -> str | None:
    """The template text of tokenizer_config.json's chat_template: a string, or a list of {"name", "template"}
    objects (the one named "default", else the first)."""
    if isinstance(value, list):
        if not all(isinstance(t, dict) for t in value):
            raise TinyserveError(f'{path}: chat_template must be a string or a list of {{"name", "template"}} objects')
        named = {t.get("name"): t.get("template") for t in value}
        value = named.get("default") or next(iter(named.values()), None)
    if value is not None and not isinstance(value, str):
        raise TinyserveError(f"{path}: chat_template must be a string, got {type(value).__name__}")
    return value


class Tokenizer:
    def __init__(self, model_dir: str | Path, cfg: ModelConfig | None = None):
        from tokenizers import Tokenizer as HFTokenizer

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise TinyserveError(f"no tokenizer.json in {model_dir}")
        try:
            self.hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a plain Exception on bad files
            raise TinyserveError(f"{path}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
        tc_path = model_dir / "tokenizer_config.json"
        self.tokenizer_config = _read_json(tc_path) if tc_path.is_file() else {}
        gc_path = model_dir / "generation_config.json"
        gen = _read_json(gc_path) if gc_path.is_file() else {}
        vocab = cfg.vocab_size if cfg else None
        gen_bos = token_ids(gen, "bos_token_id", gc_path, vocab, many=False)
        gen_eos = token_ids(gen, "eos_token_id", gc_path, vocab)

        tc = self.tokenizer_config
        bos_text, eos_text = _token_content(tc, "bos_token", tc_path), _token_content(tc, "eos_token", tc_path)
        self.bos_token = bos_text
        self.eos_token = eos_text
        self.bos_id = self.hf.token_to_id(bos_text) if bos_text else None
        if self.bos_id is None and "bos_token_id" in gen:
            self.bos_id = gen_bos[0] if gen_bos else None
        elif self.bos_id is None and cfg is not None:
            self.bos_id = cfg.bos_token_id
        if self.bos_id is not None and self.bos_token is None:
            self.bos_token = self.hf.id_to_token(self.bos_id)

        eos = set(gen_eos) | set(cfg.eos_token_ids if cfg else ())
        if eos_text and self.hf.token_to_id(eos_text) is not None:
            eos.add(self.hf.token_to_id(eos_text))
        self.eos_ids = frozenset(eos)
        if self.eos_token is None and eos:
            self.eos_token = self.hf.id_to_token(min(eos))

        # Does encode(add_special_tokens=True) put BOS first by itself (through the post-processor)?
        probe = self.hf.encode("a", add_special_tokens=True).ids
        self._post_adds_bos = bool(probe) and self.bos_id is not None and probe[0] == self.bos_id
        add_bos = tc.get("add_bos_token")
        if add_bos is not None and not isinstance(add_bos, bool):
            raise TinyserveError(f"{tc_path}: add_bos_token must be true or false, got {add_bos!r}")
        self._add_bos_by_hand = bool(add_bos) and not self._post_adds_bos and self.bos_id is not None
        self._tc_path = tc_path
        self._chat_template = tc.get("chat_template")  # checked when used (a broken one only stops --chat)
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)

    # ------------------------------------------------------------------------------------------ encode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; with add_special_tokens, BOS first where the model uses one.

        The empty prompt is BOS alone.
        """
        ids = self.hf.encode(text, add_special_tokens=add_special_tokens).ids if text else []
        wants_bos = add_special_tokens and (self._post_adds_bos or self._add_bos_by_hand)
        if wants_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------------------- chat
    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template (None when there is none); TinyserveError when tokenizer_config.json's is
        not a template."""
        return _chat_template(self._chat_template, self._tc_path)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render messages with the model's Jinja chat template, as transformers does."""
        source = self.chat_template
        if not source:
            raise TinyserveError("this model has no chat template (tokenizer_config.json has no 'chat_template')")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TinyserveError(f"chat template: {message}")

        def strftime_now(fmt):
            return datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii
        )
        env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
        try:
            template = env.from_string(source)
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TinyserveError:  # the template's own raise_exception(...)
            raise
        except Exception as e:  # a template is the model author's code: any error in it is the model's
            reason = (str(e).splitlines() or [""])[0]
            raise TinyserveError(f"{self._tc_path}: chat_template failed ({type(e).__name__}: {reason})") from None

    def encode_chat(self, user_text: str) -> list[int]:
        """Token ids of one user message in the chat format, ready for the assistant's reply."""
        text = self.apply_chat_template([{"role": "user", "content": user_text}])
        # The template writes BOS itself where the model wants it.
        return self.encode(text, add_special_tokens=False) if text else self.encode("")


class StreamDecoder:
    """Turns a growing list of token ids into text deltas.

    Each push decodes a short window of recent tokens twice (with and without the new one) and emits the
    difference. Text that ends in U+FFFD (an incomplete UTF-8 sequence from byte tokens) is held back until
    the following tokens complete it. The window starts a few tokens before the new ones, so the decoder
    sees each token with its left context (SentencePiece decoders strip the space of a window's first
    token; a window never starts at a token whose text we still have to emit).
    """

    def __init__(self, tokenizer: Tokenizer, context_ids=(), skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(context_ids)[-4:]  # a little left context from the prompt
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        text = self.tok.decode(self.ids[self.prefix_offset :], self.skip)
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            delta = text[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        text = self.tok.decode(self.ids[self.prefix_offset :], self.skip)
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :] if text.startswith(prefix) else ""
