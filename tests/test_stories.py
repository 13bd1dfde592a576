"""Real text: stories260K (llama2.c) converted by tinyserve must decode exactly as llama2.c does."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import tinyserve
from tiny_models import STORIES

EXPECTED_IDS = json.loads((STORIES / "expected_greedy200_ids.json").read_text()) if STORIES.is_dir() else []
EXPECTED_TEXT = (STORIES / "expected_greedy200.txt").read_text(encoding="utf-8") if STORIES.is_dir() else ""


def test_greedy_200_through_api(stories_dir):
    out = tinyserve.load(stories_dir, backend="numpy").generate("", max_new_tokens=200, temperature=0.0)[0]
    assert out.token_ids == EXPECTED_IDS
    assert out.text == EXPECTED_TEXT
    assert out.finish_reason == "length"


def test_greedy_200_through_cli(stories_dir):
    cmd = [sys.executable, "-m", "tinyserve", "generate", "--model", str(stories_dir), "--backend", "numpy",
           "--max-new-tokens", "200", "--temperature", "0"]
    js = subprocess.run(cmd + ["--json"], capture_output=True, text=True, check=True)
    obj = json.loads(js.stdout)
    assert obj["token_ids"] == EXPECTED_IDS and obj["text"] == EXPECTED_TEXT
    assert obj["prompt_tokens"] == 1 and obj["generated_tokens"] == 200 and obj["tokens_per_s"] > 0
    plain = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert plain.stdout == EXPECTED_TEXT + "\n"  # streamed to the terminal as it is made


def test_llama2c_tokenizer_bin_gives_same_model(stories_dir, tmp_path):
    from tinyserve.convert.llama2c import convert_llama2c

    d = convert_llama2c(STORIES / "stories260K.bin", STORIES / "tok512.bin", tmp_path / "m")
    a = tinyserve.load(d, backend="numpy")
    b = tinyserve.load(stories_dir, backend="numpy")
    assert a.generate("Once upon a time", max_new_tokens=20)[0].token_ids == \
        b.generate("Once upon a time", max_new_tokens=20)[0].token_ids


def test_converted_tokenizer_encodes_like_sentencepiece(stories_dir, shared):
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(STORIES / "tok512.model"))
    tok = tinyserve.load(stories_dir, backend="numpy").tokenizer
    text = (shared / "corpora" / "tinystories_val.txt").read_text(encoding="utf-8")
    paragraphs = [p for p in text.split("\n\n") if p.strip()][:200]
    for p in paragraphs:
        assert tok.encode(p) == [1] + sp.encode(p)


def test_converted_model_loads_in_transformers_with_same_logits(stories_dir):
    pytest.importorskip("transformers")
    from tiny_models import hf_logits, hf_model

    ids = [1] + EXPECTED_IDS[:60]
    ours = tinyserve.load(stories_dir, backend="numpy").logits(ids)
    theirs = hf_logits(hf_model(stories_dir), ids)
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


def test_stop_string_and_streaming(stories_dir):
    llm = tinyserve.load(stories_dir, backend="numpy")
    events = []
    out = llm.generate("", max_new_tokens=200, temperature=0.0, stop=["park"], on_event=events.append)[0]
    assert out.finish_reason == "stop"
    assert out.text == EXPECTED_TEXT[: EXPECTED_TEXT.index("park")]
    assert "".join(e.text for e in events) == out.text
    assert events[-1].finished and sum(e.finished for e in events) == 1


def test_sampling_is_seeded(stories_dir):
    llm = tinyserve.load(stories_dir, backend="numpy")
    kw = dict(max_new_tokens=30, temperature=0.9, top_p=0.95)
    a = llm.generate("Once", seed=7, **kw)[0].token_ids
    b = llm.generate("Once", seed=7, **kw)[0].token_ids
    c = llm.generate("Once", seed=8, **kw)[0].token_ids
    assert a == b and a != c


def test_context_is_never_exceeded(stories_dir):
    llm = tinyserve.load(stories_dir, backend="numpy")
    out = llm.generate("Once upon a time", max_new_tokens=100, context=16)[0]
    assert out.finish_reason == "context"
    assert out.prompt_tokens + len(out.token_ids) == 16
    with pytest.raises(tinyserve.TinyserveError, match="too long"):
        llm.generate("Once upon a time there was a girl who liked to play", context=8)
