"""The small model the project ships in weights/tinystories: loads with no arguments, reads as English, and
keeps the held-out perplexity that weights/README.md reports (within 10%)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tinyserve
from tinyserve.engine import DEFAULT_MODEL
from tinyserve.validate import perplexity
from tiny_models import SHARED

README = DEFAULT_MODEL.parent / "README.md"
CORPUS = SHARED / "corpora" / "tinystories_val.txt"


@pytest.fixture(scope="module")
def llm():
    return tinyserve.load()


def test_default_model_files(llm):
    cfg = llm.config
    assert llm.model_dir == DEFAULT_MODEL
    assert cfg.architecture == "LlamaForCausalLM" and cfg.tie_word_embeddings
    assert cfg.num_attention_heads == 2 * cfg.num_key_value_heads  # grouped-query attention
    total = sum(p.stat().st_size for p in DEFAULT_MODEL.iterdir())
    assert total < 10_000_000, f"the shipped model is {total} bytes"
    assert llm.tokenizer.bos_id == 1 and 2 in llm.tokenizer.eos_ids


def test_checkpoint_mapping_released_after_load(llm):
    """After loading, the LLM keeps no mapping of its files (the cpu backend copied the weights; weights used in
    place would keep theirs alive by themselves); reading a tensor again maps the file again."""
    assert all(f._mmap is None for f in llm.ckpt.files)
    again = llm.ckpt.get("model.embed_tokens.weight")
    np.testing.assert_array_equal(again, llm.ops.download(llm.weights.embed_tokens))


def _english_fraction(text: str) -> float:
    vocab = set(re.findall(r"[a-z]+", CORPUS.read_text(encoding="utf-8").lower()))
    words = re.findall(r"[a-z]+", text.lower())
    return sum(w in vocab for w in words) / max(1, len(words))


def test_continuations_read_as_english(llm):
    greedy = llm.generate("Once upon a time", max_new_tokens=80)[0]
    readme = " ".join(re.sub(r"^> ?", "", README.read_text(encoding="utf-8"), flags=re.M).split())  # unquote
    assert " ".join(greedy.text.split()) in readme  # the greedy sample the README reports
    assert greedy.text.count(".") >= 2 and _english_fraction(greedy.text) > 0.97
    for seed in (1, 2):
        out = llm.generate("Once upon a time", max_new_tokens=80, temperature=0.8, top_p=0.9, seed=seed)[0]
        assert _english_fraction(out.text) > 0.9 and len(out.text.split()) >= 10


def test_held_out_perplexity_matches_readme(llm, tmp_path):
    reported = float(re.search(r"## Held-out perplexity: ([0-9.]+)", README.read_text(encoding="utf-8")).group(1))
    sys.path.insert(0, str(DEFAULT_MODEL.parent))
    try:
        import train  # weights/train.py: the recipe's own split (its torch import is lazy)
    finally:
        sys.path.pop(0)
    _, held_out = train.split_stories(train.read_stories(str(CORPUS)))
    assert len(held_out) == 431
    text = tmp_path / "heldout.txt"
    text.write_text("\n\n".join(held_out) + "\n", encoding="utf-8")
    res = perplexity(llm, text)
    assert res.tokens == 21220
    assert abs(res.perplexity - reported) <= 0.10 * reported, (res.perplexity, reported)


def test_transformers_loads_it_with_the_same_logits(llm):
    pytest.importorskip("transformers")
    from tiny_models import hf_logits, hf_model

    ids = llm.tokenizer.encode("Once upon a time there was a little dog named Max.")
    theirs = hf_logits(hf_model(DEFAULT_MODEL), ids)
    assert np.abs(llm.logits(ids) - theirs).max() <= 1e-4 * np.abs(theirs).max()


def test_readme_first_command_needs_no_model_argument():
    r = subprocess.run([sys.executable, "-m", "tinyserve", "generate", "--prompt", "Once upon a time",
                        "--max-new-tokens", "20", "--json"], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert obj["generated_tokens"] >= 1 and obj["text"].strip()
