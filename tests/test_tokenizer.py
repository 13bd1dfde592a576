"""Tokenizer wrapper: special tokens from real hub files, chat templates, streaming decode."""

from __future__ import annotations

import json
import shutil

import pytest

import tinyserve
from tinyserve.config import config_from_dict
from tinyserve.tokenizer import StreamDecoder, Tokenizer
from tiny_models import HF_CONFIGS

TEMPLATED = [
    "meta-llama__Llama-3.2-3B-Instruct",
    "meta-llama__Llama-3.1-8B-Instruct",
    "Qwen__Qwen2.5-7B-Instruct",
    "mistralai__Mistral-7B-Instruct-v0.2",
    "reconstructed/TinyLlama__TinyLlama-1.1B-Chat-v1.0",
]


def _model_dir(tmp_path, stories_dir, name):
    """A directory with the real tokenizer_config.json (chat template) and a tokenizer.json."""
    d = tmp_path / name.replace("/", "_")
    d.mkdir()
    src = HF_CONFIGS / name
    shutil.copy(src / "tokenizer_config.json", d / "tokenizer_config.json")
    tok_json = src / "tokenizer.json"
    shutil.copy(tok_json if tok_json.is_file() else stories_dir / "tokenizer.json", d / "tokenizer.json")
    return d


@pytest.mark.parametrize("name", TEMPLATED)
def test_chat_template_renders_like_transformers(tmp_path, stories_dir, name):
    pytest.importorskip("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template

    d = _model_dir(tmp_path, stories_dir, name)
    tok = Tokenizer(d)
    messages = [{"role": "user", "content": "Write a haiku about caches."}]
    ours = tok.apply_chat_template(messages)
    tc = json.loads((d / "tokenizer_config.json").read_text())

    def content(t):
        return t.get("content") if isinstance(t, dict) else t

    theirs = render_jinja_template(
        [messages], chat_template=tok.chat_template, add_generation_prompt=True,
        bos_token=content(tc.get("bos_token")) or "", eos_token=content(tc.get("eos_token")) or "",
    )
    theirs = theirs[0][0] if isinstance(theirs, tuple) else theirs
    theirs = theirs[0] if isinstance(theirs, list) else theirs
    if "strftime_now" in tok.chat_template:  # Llama 3.2 writes today's date: the same day on both sides
        assert ours.split("\n\n", 1)[1] == theirs.split("\n\n", 1)[1]
    else:
        assert ours == theirs
    assert "Write a haiku about caches." in ours


def test_mistral_real_tokenizer_encodes_like_transformers(tmp_path, stories_dir):
    pytest.importorskip("transformers")
    from transformers import PreTrainedTokenizerFast

    d = _model_dir(tmp_path, stories_dir, "mistralai__Mistral-7B-Instruct-v0.2")
    ours = Tokenizer(d)
    theirs = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), bos_token="<s>", eos_token="</s>")
    text = "Hello world! Café ☃ — 日本語 and   spaces."
    assert ours.encode(text) == theirs(text)["input_ids"]
    assert ours.bos_id == 1 and 2 in ours.eos_ids
    ids = ours.encode_chat("Hi")
    rendered = ours.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert rendered == "<s>[INST] Hi [/INST]"
    assert ids == theirs(rendered, add_special_tokens=False)["input_ids"] and ids[0] == 1 and ids.count(1) == 1


def test_eos_ids_from_config_and_generation_config(tmp_path, stories_dir):
    d = _model_dir(tmp_path, stories_dir, "meta-llama__Llama-3.2-3B-Instruct")
    gen = json.loads((HF_CONFIGS / "meta-llama__Llama-3.2-3B-Instruct" / "generation_config.json").read_text())
    shutil.copy(HF_CONFIGS / "meta-llama__Llama-3.2-3B-Instruct" / "generation_config.json", d)
    cfg = config_from_dict(json.loads((HF_CONFIGS / "meta-llama__Llama-3.2-3B-Instruct" / "config.json").read_text()))
    tok = Tokenizer(d, cfg)
    assert set(gen["eos_token_id"]) <= tok.eos_ids


def test_no_chat_template_is_a_clear_error(stories_dir):
    tok = tinyserve.load(stories_dir, backend="numpy").tokenizer
    with pytest.raises(tinyserve.TinyserveError, match="no chat template"):
        tok.encode_chat("hi")


def test_stream_decoder_never_splits_a_character(stories_dir):
    tok = tinyserve.load(stories_dir, backend="numpy").tokenizer
    text = "Lily saw a café ☃ and 日本 🙂 there."
    ids = tok.encode(text)
    dec = StreamDecoder(tok, ids[:1])
    deltas = [dec.push(t) for t in ids[1:]]
    deltas.append(dec.flush())
    assert "".join(deltas) == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)
    byte_tokens = [t for t in ids if tok.hf.id_to_token(t).startswith("<0x")]
    assert len(byte_tokens) >= 6  # the test really exercises byte fallback
    # a continuation keeps the space that starts it: "Once upon a" + " time"
    prompt = tok.encode("Once upon a")
    dec = StreamDecoder(tok, prompt)
    assert dec.push(tok.encode(" time", add_special_tokens=False)[-1]) == " time"
