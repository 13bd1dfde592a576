"""SentencePiece / llama2.c tokenizer -> Hugging Face tokenizer (tinyserve.convert.sp_tokenizer).

The outside references: the ``sentencepiece`` package itself for encoding, llama2.c's printed text
(expected_greedy200.txt) for decoding, and transformers.AutoTokenizer for the written files.
"""

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from tinyserve.convert.sp_tokenizer import (
    PieceType,
    SPVocab,
    build_tokenizer,
    load_sentencepiece_vocab,
    write_tokenizer_files,
)
from tinyserve.errors import TinyserveError

spm = pytest.importorskip("sentencepiece")

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "models" / "stories260K"
CORPUS = SHARED / "corpora" / "tinystories_val.txt"
if not (STORIES / "tok512.model").is_file():
    pytest.skip(f"shared test models not found at {STORIES}", allow_module_level=True)

FORMATS = ["tok512.model", "tok512.bin"]
TRICKY = [
    "",
    " ",
    "   ",
    "hello",
    " leading space",
    "trailing space ",
    "  multiple   spaces  inside  ",
    "two\nlines\n",
    "\n\nblank lines first",
    " \n spaces around a newline \n ",
    "tab\there",
    "café ☃ 日本",  # é is a piece; ☃ and 日本 need the byte fallback
    "emoji 🙂 and a literal ▁ sign",
    "<0x0A> is text, not a byte token",
    "Once upon a time, there was a little girl named Lily.",
]


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(STORIES / "tok512.model"))


@pytest.fixture(scope="module", params=FORMATS)
def vocab(request):
    return load_sentencepiece_vocab(STORIES / request.param, vocab_size=512)


@pytest.fixture(scope="module")
def tok(vocab):
    return build_tokenizer(vocab)


@pytest.fixture(scope="module")
def paragraphs():
    if not CORPUS.is_file():
        pytest.skip(f"corpus not found at {CORPUS}")
    text = CORPUS.read_text(encoding="utf-8")
    return [p for p in text.split("\n\n") if p.strip()][:200]


def expected_greedy():
    ids = json.loads((STORIES / "expected_greedy200_ids.json").read_text())
    text = (STORIES / "expected_greedy200.txt").read_bytes().decode("utf-8")  # bytes: no newline translation
    return ids, text


# ---------------------------------------------------------------------------------------------- reading


def test_vocab_contents(vocab):
    assert len(vocab) == 512
    assert (vocab.unk_id, vocab.bos_id, vocab.eos_id) == (0, 1, 2)
    assert vocab.pieces[:3] == ["<unk>", "<s>", "</s>"]
    assert vocab.types[:3] == [PieceType.UNKNOWN, PieceType.CONTROL, PieceType.CONTROL]
    assert vocab.pieces[3] == "<0x00>" and vocab.pieces[258] == "<0xFF>"
    assert set(vocab.types[3:259]) == {PieceType.BYTE}
    assert vocab.pieces[259] == "▁t" and vocab.scores[260] == -1.0
    assert vocab.add_dummy_prefix and vocab.byte_fallback
    # tok512 was trained with SentencePiece's default normalizer: runs of spaces collapse.
    assert vocab.remove_extra_whitespaces


def test_bin_and_model_give_the_same_vocab():
    from_model = load_sentencepiece_vocab(STORIES / "tok512.model")
    from_bin = load_sentencepiece_vocab(STORIES / "tok512.bin", vocab_size=512)
    assert from_bin.pieces == from_model.pieces
    assert from_bin.scores == from_model.scores
    assert from_bin.types == from_model.types
    # Without vocab_size the .bin is read to its end.
    assert load_sentencepiece_vocab(STORIES / "tok512.bin").pieces == from_model.pieces


# --------------------------------------------------------------------------------------------- encoding


def test_paragraphs_encode_like_sentencepiece(tok, sp, paragraphs):
    assert len(paragraphs) == 200
    for i, text in enumerate(paragraphs):
        assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text), f"paragraph {i}"


@pytest.mark.parametrize("text", TRICKY, ids=repr)
def test_tricky_strings_encode_like_sentencepiece(tok, sp, text):
    assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text)


def test_add_special_tokens_prepends_bos(tok, sp):
    for text in ["Once upon a time", "", "café"]:
        ids = tok.encode(text).ids  # add_special_tokens defaults to True
        assert ids[0] == 1
        assert ids[1:] == sp.encode(text)


# --------------------------------------------------------------------------------------------- decoding


def test_decode_reproduces_llama2c_text(tok):
    ids, text = expected_greedy()
    assert not text.endswith("\n") and "\n" in text  # the file has no trailing newline; <0x0A> gives the others
    assert len(ids) == 200
    assert tok.decode([1] + ids, skip_special_tokens=True) == text
    assert tok.decode(ids) == text


def test_decode_round_trips_paragraphs(tok, paragraphs):
    for text in paragraphs[:50]:
        clean = re.sub(" +", " ", text).strip(" ")  # this vocabulary's normalizer collapses runs of spaces
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=True) == clean


def test_decode_byte_fallback(tok, sp):
    text = "café ☃ 日本 🙂"
    ids = sp.encode(text)
    assert any(3 <= i <= 258 for i in ids)  # really uses byte tokens
    assert tok.decode(ids) == text


# ------------------------------------------------------------------------- other normalizer settings


def _with_settings(tmp_path, normalizer=b"", trainer=b""):
    """tok512.model with extra NormalizerSpec / TrainerSpec fields appended.

    Protobuf merges a repeated occurrence of a sub-message field into the first one, so appending
    ``normalizer_spec { ... }`` overrides just those settings, for sentencepiece and for our reader alike.
    """
    data = (STORIES / "tok512.model").read_bytes()
    if normalizer:
        data += bytes([0x1A, len(normalizer)]) + normalizer  # field 3, length-delimited
    if trainer:
        data += bytes([0x12, len(trainer)]) + trainer  # field 2, length-delimited
    path = tmp_path / "variant.model"
    path.write_bytes(data)
    return path, spm.SentencePieceProcessor(model_proto=data)


@pytest.mark.parametrize(
    "normalizer",
    [b"\x20\x00", b"\x18\x00", b"\x18\x00\x20\x00"],
    ids=["keep-extra-spaces", "no-dummy-prefix", "neither"],
)
def test_other_normalizer_settings_match_sentencepiece(tmp_path, paragraphs, normalizer):
    path, sp = _with_settings(tmp_path, normalizer=normalizer)
    vocab = load_sentencepiece_vocab(path)
    assert vocab.remove_extra_whitespaces == (b"\x20\x00" not in normalizer)
    assert vocab.add_dummy_prefix == (b"\x18\x00" not in normalizer)
    tok = build_tokenizer(vocab)
    for text in TRICKY + paragraphs[:20]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == sp.encode(text), repr(text)
        assert tok.decode(ids) == sp.decode(ids), repr(text)


@pytest.mark.parametrize(
    "bos_piece, bos_id", [(b"</s>", 2), (b"<x>", -1), (b"<0x41>", -1)], ids=["eos-piece", "missing", "not-control"]
)
def test_special_tokens_are_found_by_piece_text(tmp_path, bos_piece, bos_id):
    # Like SentencePiece, we find BOS as the control piece named by trainer_spec.bos_piece (field 46).
    path, sp = _with_settings(tmp_path, trainer=b"\xf2\x02" + bytes([len(bos_piece)]) + bos_piece)
    vocab = load_sentencepiece_vocab(path)
    assert vocab.bos_id == sp.bos_id() == bos_id
    assert (vocab.eos_id, vocab.unk_id, vocab.pad_id) == (sp.eos_id(), sp.unk_id(), sp.pad_id()) == (2, 0, -1)
    expected = sp.encode("Once", add_bos=bos_id >= 0)
    assert build_tokenizer(vocab).encode("Once").ids == expected


def _llama2c_bin(pieces, max_len=8):
    """A llama2.c tokenizer.bin as llama2.c's exporter writes it (spaces, not ▁, in the pieces)."""
    out = struct.pack("<i", max_len)
    for i, piece in enumerate(pieces):
        raw = piece.encode("utf-8")
        out += struct.pack("<fi", -float(i), len(raw)) + raw
    return out


def test_bin_keeps_runs_of_spaces_when_the_vocab_has_such_pieces(tmp_path):
    path = tmp_path / "tokenizer.bin"
    path.write_bytes(_llama2c_bin(["<unk>", "\n<s>\n", "\n</s>\n", " ", "a", "  ", " a"]))
    vocab = load_sentencepiece_vocab(path)
    assert vocab.pieces[3:] == ["▁", "a", "▁▁", "▁a"]
    assert not vocab.byte_fallback  # no <0xNN> pieces
    assert not vocab.remove_extra_whitespaces  # "▁▁" exists, so runs of spaces were kept in training
    tok = build_tokenizer(vocab)
    # "▁a▁▁a": "▁▁" (score -5) outscores "▁a" (score -6), so it is merged first.
    assert tok.encode("a  a", add_special_tokens=False).tokens == ["▁a", "▁▁", "a"]
    assert tok.decode(tok.encode("a  a").ids, skip_special_tokens=True) == "a  a"
    # The caller can override the inference.
    vocab = load_sentencepiece_vocab(path, remove_extra_whitespaces=True)
    assert build_tokenizer(vocab).encode("a  a", add_special_tokens=False).tokens == ["▁a", "▁a"]


@pytest.mark.parametrize("name", FORMATS)
def test_format_is_sniffed_without_extension(tmp_path, name):
    path = tmp_path / "tokenizer"
    path.write_bytes((STORIES / name).read_bytes())
    assert load_sentencepiece_vocab(path).pieces == load_sentencepiece_vocab(STORIES / "tok512.model").pieces


# ----------------------------------------------------------------------------------------- transformers


def test_autotokenizer_loads_written_files(tmp_path, vocab, sp, paragraphs):
    transformers = pytest.importorskip("transformers")
    tokenizer_json, config_json = write_tokenizer_files(vocab, tmp_path, model_max_length=512)
    assert tokenizer_json == tmp_path / "tokenizer.json" and config_json.is_file()
    config = json.loads(config_json.read_text())
    assert config["bos_token"] == "<s>" and config["eos_token"] == "</s>" and config["unk_token"] == "<unk>"
    assert config["add_bos_token"] is True

    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (1, 2, 0)
    assert hf.model_max_length == 512
    for text in paragraphs[:5] + TRICKY:
        assert hf(text)["input_ids"] == [1] + sp.encode(text), repr(text)
        assert hf.encode(text, add_special_tokens=False) == sp.encode(text), repr(text)
    ids, text = expected_greedy()
    assert hf.decode([1] + ids, skip_special_tokens=True) == text


# ------------------------------------------------------------------------------------------ bad input


def test_missing_file():
    with pytest.raises(TinyserveError, match="not found"):
        load_sentencepiece_vocab(STORIES / "no-such-tokenizer.model")


@pytest.mark.parametrize("keep", [0, 3, 4, 10, 3000, 6226])
def test_truncated_bin(tmp_path, keep):
    path = tmp_path / "tokenizer.bin"
    path.write_bytes((STORIES / "tok512.bin").read_bytes()[:keep])
    with pytest.raises(TinyserveError):
        load_sentencepiece_vocab(path, vocab_size=512)


def test_bin_with_wrong_vocab_size(tmp_path):
    with pytest.raises(TinyserveError, match="vocab_size"):
        load_sentencepiece_vocab(STORIES / "tok512.bin", vocab_size=500)  # bytes left over
    with pytest.raises(TinyserveError, match="truncated"):
        load_sentencepiece_vocab(STORIES / "tok512.bin", vocab_size=600)


def test_bin_with_corrupt_length(tmp_path):
    data = bytearray((STORIES / "tok512.bin").read_bytes())
    data[8:12] = struct.pack("<i", -5)  # the length of token 0
    path = tmp_path / "tokenizer.bin"
    path.write_bytes(bytes(data))
    with pytest.raises(TinyserveError, match="corrupt"):
        load_sentencepiece_vocab(path, vocab_size=512)


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes_as_model(tmp_path, seed):
    data = np.random.default_rng(seed).integers(0, 256, size=4000, dtype=np.uint8).tobytes()
    path = tmp_path / "random.model"
    path.write_bytes(data)
    with pytest.raises(TinyserveError):
        load_sentencepiece_vocab(path)


@pytest.mark.parametrize("keep", [1, 100, 3000, 7521])
def test_truncated_model(tmp_path, keep):
    path = tmp_path / "tok.model"
    path.write_bytes((STORIES / "tok512.model").read_bytes()[:keep])
    with pytest.raises(TinyserveError):
        load_sentencepiece_vocab(path)


def test_model_with_wrong_vocab_size():
    with pytest.raises(TinyserveError, match="vocab_size"):
        load_sentencepiece_vocab(STORIES / "tok512.model", vocab_size=32000)


def test_unigram_model_is_refused(tmp_path):
    path, _ = _with_settings(tmp_path, trainer=b"\x18\x01")  # model_type = UNIGRAM
    with pytest.raises(TinyserveError, match="UNIGRAM"):
        load_sentencepiece_vocab(path)


def test_duplicate_pieces_are_refused():
    vocab = SPVocab(pieces=["<unk>", "<s>", "</s>", "a", "a"], scores=[0.0] * 5, types=[2, 3, 3, 1, 1])
    with pytest.raises(TinyserveError, match="twice"):
        build_tokenizer(vocab)
