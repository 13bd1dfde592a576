"""Bad outputs and bad converter inputs: one line on stderr, exit status 2, nothing half-written left behind.

Outputs: convert / quantize directories (a parent that is a file, a place where no folder can be made, the
parent folders a failed run created), dump / perplexity --save-logits files (a directory, an unwritable
place, an existing dump). Inputs: NaN / infinity anywhere in the weights (convert llama2c, convert gguf,
quantize, perplexity), llama2.c headers whose sizes overflow, GGUF scores that are not numbers or NaN, dumps and
logits files with malformed metadata or no tokens.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from test_gguf import write_gguf  # stories260K.gguf copied with changes
from tiny_models import STORIES, cli_error
from tinyserve import validate as v
from tinyserve.convert.common import output_directory
from tinyserve.convert.llama2c import MAGIC, read_llama2c

BIN, TOK_MODEL, TOK_BIN, GGUF = (STORIES / n for n in ("stories260K.bin", "tok512.model", "tok512.bin",
                                                        "stories260K.gguf"))
UNWRITABLE = Path("/proc/tinyserve-test-out")  # no file or folder can be created in /proc, even by root
unwritable = pytest.param("unwritable", marks=pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc"))
TEXT = "Once upon a time there was a cat.\n\nThe cat was happy. It played in the sun.\n"


def listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


@pytest.fixture()
def text(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text(TEXT)
    return p


@pytest.fixture(scope="module")
def nan_model(stories_dir, tmp_path_factory):
    """stories260K with a NaN in its final norm (a float tensor quantize copies as it is)."""
    from safetensors.numpy import load_file, save_file

    d = tmp_path_factory.mktemp("nan") / "m"
    shutil.copytree(stories_dir, d)
    t = load_file(str(d / "model.safetensors"))
    t["model.norm.weight"][-1] = np.nan
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


# ------------------------------------------------------------------------ convert / quantize output dirs
COMMANDS = {
    "llama2c": lambda m: ["convert", "llama2c", BIN, "--tokenizer", TOK_MODEL],
    "gguf": lambda m: ["convert", "gguf", GGUF],
    "quantize": lambda m: ["quantize", "--model", m, "--bits", "8"],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("where", ["afile/sub", "afile/sub/deeper", unwritable])
def test_output_directory_that_cannot_be_made(command, where, stories_dir, tmp_path, capsys):
    if command == "gguf":
        pytest.importorskip("gguf")
    work = tmp_path / "work"
    work.mkdir()
    (work / "afile").write_text("x")
    out = UNWRITABLE if where == "unwritable" else work / where
    cli_error(capsys, *COMMANDS[command](stories_dir), "--out", out, words=("cannot write",))
    assert listing(work) == ["afile"] and (work / "afile").read_text() == "x"
    assert not UNWRITABLE.exists()


def test_failed_conversion_removes_the_folders_it_created(tmp_path, capsys):
    """A tokenizer that fails while the output is written (a byte piece twice): no new1/new2 left over."""
    data = TOK_BIN.read_bytes()
    parts, pos, i = [data[:4]], 4, 0
    while pos < len(data):
        score, n = struct.unpack_from("<fi", data, pos)
        piece = b"<0x41>" if i == 300 else data[pos + 8 : pos + 8 + n]
        parts.append(struct.pack("<fi", score, len(piece)) + piece)
        pos, i = pos + 8 + n, i + 1
    tok = tmp_path / "dup.bin"
    tok.write_bytes(b"".join(parts))
    out = tmp_path / "new1" / "new2" / "model"
    cli_error(capsys, "convert", "llama2c", BIN, "--tokenizer", tok, "--out", out, words=("twice",))
    assert listing(tmp_path) == ["dup.bin"]


def test_output_directory_removes_created_parents_on_any_error(tmp_path):
    (tmp_path / "kept").mkdir()
    out = tmp_path / "kept" / "a" / "b" / "model"
    with pytest.raises(RuntimeError):
        with output_directory(out) as tmp:
            (tmp / "half.json").write_text("{")
            raise RuntimeError("conversion failed")
    assert listing(tmp_path) == ["kept"]


# ---------------------------------------------------------------------------- NaN / infinity in weights
def llama2c_with(tmp_path, name, value) -> Path:
    """stories260K.bin with the LAST value of tensor `name` set to value (so the whole tensor must be read)."""
    _, tensors = read_llama2c(BIN)
    raw = bytearray(BIN.read_bytes())
    names = list(tensors)  # in file order
    pos = 256 if raw[:4] == struct.pack("<I", MAGIC) else 28
    pos += 4 * (sum(tensors[n].size for n in names[: names.index(name)]) + tensors[name].size - 1)
    assert struct.unpack_from("<f", raw, pos)[0] == tensors[name].reshape(-1)[-1]
    raw[pos : pos + 4] = struct.pack("<f", value)
    p = tmp_path / f"{name}.bin"
    p.write_bytes(bytes(raw))
    return p


@pytest.mark.parametrize("name, value", [("wq", np.nan), ("w2", np.inf), ("rms_ffn", -np.inf), ("wo", np.nan)])
def test_convert_llama2c_refuses_non_finite_weights(name, value, tmp_path, capsys):
    src = llama2c_with(tmp_path, name, value)
    out = tmp_path / "out"
    cli_error(capsys, "convert", "llama2c", src, "--tokenizer", TOK_MODEL, "--out", out,
              words=(f"tensor {name} ", "NaN or infinity"))
    assert listing(tmp_path) == [src.name]


def poison(target, value):
    def fn(name, a):
        if name == target:
            a = a.copy()
            a.reshape(-1)[-1] = value
        return a, None

    return fn


def nan_q8_0_scale(target):
    """target quantized to Q8_0 with the scale of its last block NaN (the int8 values stay finite)."""
    gguf = pytest.importorskip("gguf")

    def fn(name, a):
        if name != target:
            return a, None
        q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
        q[-1, -34:-32] = np.array([np.nan], np.float16).view(np.uint8)
        return q, gguf.GGMLQuantizationType.Q8_0

    return fn


@pytest.mark.parametrize("name, make", [
    ("blk.4.ffn_down.weight", lambda n: poison(n, np.nan)),
    ("blk.2.attn_norm.weight", lambda n: poison(n, np.inf)),
    ("blk.4.attn_q.weight", nan_q8_0_scale),
])
def test_convert_gguf_refuses_non_finite_weights(name, make, tmp_path, capsys):
    src = write_gguf(tmp_path / "m.gguf", make(name))
    cli_error(capsys, "convert", "gguf", src, "--out", tmp_path / "out", words=(name, "NaN or infinity"))
    assert listing(tmp_path) == ["m.gguf"]


@pytest.mark.parametrize("key, value, kind", [
    ("tokenizer.ggml.scores", ["a"] * 512, "STRING"),  # an array of strings
    ("llama.rope.freq_base", float("inf"), None),
    ("llama.attention.layer_norm_rms_epsilon", float("inf"), None),
])
def test_convert_gguf_refuses_bad_metadata(key, value, kind, tmp_path, capsys):
    gguf = pytest.importorskip("gguf")
    V = gguf.GGUFValueType
    entry = (value, V.ARRAY, V[kind]) if kind else (value, V.FLOAT32, None)
    src = write_gguf(tmp_path / "m.gguf", meta={key: entry})
    cli_error(capsys, "convert", "gguf", src, "--out", tmp_path / "out", words=(key,))
    assert listing(tmp_path) == ["m.gguf"]


def test_convert_gguf_refuses_a_nan_token_score(tmp_path, capsys):
    gguf = pytest.importorskip("gguf")
    V = gguf.GGUFValueType
    scores = [-float(i) for i in range(512)]
    scores[300] = float("nan")  # merges are ranked by score: a NaN has no rank
    src = write_gguf(tmp_path / "m.gguf", meta={"tokenizer.ggml.scores": (scores, V.ARRAY, V.FLOAT32)})
    cli_error(capsys, "convert", "gguf", src, "--out", tmp_path / "out", words=("id 300", "NaN score"))
    assert listing(tmp_path) == ["m.gguf"]


def test_quantize_refuses_non_finite_weights(nan_model, tmp_path, capsys):
    cli_error(capsys, "quantize", "--model", nan_model, "--bits", "8", "--out", tmp_path / "q",
              words=("model.norm.weight", "NaN or infinity"))
    assert listing(tmp_path) == []


def test_perplexity_of_a_model_with_nan_weights(nan_model, text, tmp_path, capsys):
    saved = tmp_path / "base.safetensors"
    cli_error(capsys, "perplexity", "--model", nan_model, "--backend", "numpy", "--text", text,
              "--save-logits", saved, words=("loss", "NaN"))
    assert listing(tmp_path) == ["t.txt"]


# ------------------------------------------------------------------------------- llama2.c header sizes
SIZES = (4, 2**31 - 1, 1342177280, 1, 1, 10, 4)  # dim, hidden, layers, heads, kv heads, vocab, seq_len


@pytest.mark.parametrize("header", [  # sizes whose int64 products wrap around, to a file size that "fits"
    struct.pack("<7i", *SIZES),
    struct.pack("<Ii7iB", MAGIC, 1, *SIZES, 1).ljust(256, b"\0"),
    struct.pack("<Ii7iB", MAGIC, 1, *SIZES, 0).ljust(256, b"\0"),
], ids=["v0", "v1", "v1-unshared"])
def test_llama2c_header_with_absurd_sizes(header, tmp_path, capsys):
    src = tmp_path / "big.bin"
    src.write_bytes(header + bytes(4000))
    cli_error(capsys, "convert", "llama2c", src, "--tokenizer", TOK_MODEL, "--out", tmp_path / "out",
              words=("big.bin",))
    assert listing(tmp_path) == ["big.bin"]


# ------------------------------------------------------------------------ dump and --save-logits paths
@pytest.mark.parametrize("where", ["existing dir", unwritable])
@pytest.mark.parametrize("command", ["dump", "perplexity"])
def test_output_file_that_cannot_be_written(command, where, stories_dir, text, tmp_path, capsys):
    out = tmp_path / "existing"
    out.mkdir()
    if where == "unwritable":
        out = UNWRITABLE
    args = (["dump", "--prompt", "hi", "--out", out] if command == "dump" else
            ["perplexity", "--text", text, "--save-logits", out])
    # checked before the model is loaded: with no model at all, the output path is what is reported
    for model in (stories_dir, tmp_path / "no-model"):
        cli_error(capsys, *args, "--model", model, "--backend", "numpy", words=("cannot write", str(out)))
    assert listing(tmp_path) == ["existing", "t.txt"]


def test_dump_does_not_overwrite_a_file(stories_dir, tmp_path, capsys):
    out = tmp_path / "a.safetensors"
    out.write_text("mine")
    cli_error(capsys, "dump", "--model", stories_dir, "--backend", "numpy", "--prompt", "hi",
              "--out", out, words=("already exists",))
    assert out.read_text() == "mine" and listing(tmp_path) == ["a.safetensors"]


# -------------------------------------------------------------------- malformed dumps and logits files
@pytest.fixture(scope="module")
def dump_a(stories_dir, tmp_path_factory):
    return v.dump(stories_dir, "Once upon a time", tmp_path_factory.mktemp("dumps") / "a.safetensors",
                  backend="numpy")


def with_header(src: Path, dst: Path, change) -> Path:
    """A copy of the safetensors file src whose JSON header is change(header) (the tensors' bytes kept)."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = change(json.loads(raw[8 : 8 + n]))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    dst.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    return dst


def set_metadata(value):
    return lambda h: {**h, "__metadata__": value}


def set_config(text):
    return lambda h: {**h, "__metadata__": {**h["__metadata__"], "config": text}}


@pytest.mark.parametrize("change, words", [
    (set_metadata("format format_version config"), ["metadata"]),
    (set_metadata(5), ["metadata"]),
    (set_config("[" * 100_000 + "]" * 100_000), ["config"]),
    (set_config('{"num_hidden_layers": 1e999, "hidden_size": 64, "vocab_size": 512}'), ["config"]),
])
def test_compare_a_malformed_dump(dump_a, change, words, tmp_path, capsys):
    bad = with_header(dump_a, tmp_path / "bad.safetensors", change)
    cli_error(capsys, "compare", dump_a, bad, words=("bad.safetensors", *words))
    cli_error(capsys, "compare", bad, dump_a, words=("bad.safetensors", *words))


def test_compare_dumps_of_zero_tokens(dump_a, tmp_path, capsys):
    d = v.read_dump(dump_a)
    tensors = {k: a[:0] for k, a in d.acts.items()}
    tensors["token_ids"] = d.token_ids[:0]
    empty = v.write_safetensors(tmp_path / "empty.safetensors", tensors, d.meta)
    cli_error(capsys, "compare", empty, empty, words=("empty.safetensors", "no tokens"))


@pytest.fixture()
def base_logits(stories_dir, text, tmp_path):
    import tinyserve

    path = tmp_path / "base.safetensors"
    v.perplexity(tinyserve.load(stories_dir, backend="numpy"), text, save_logits=path)
    return path


def nan_last_logit(path: Path) -> Path:
    raw = bytearray(path.read_bytes())
    raw[-4:] = struct.pack("<f", np.nan)  # logits is the last tensor
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("make, words", [
    (lambda p: with_header(p, p, set_metadata("format")), ["metadata"]),
    (lambda p: with_header(p, p, set_metadata(["format", "format_version"])), []),
    (nan_last_logit, ["NaN"]),
])
def test_kl_base_malformed(base_logits, make, words, stories_dir, text, capsys):
    make(base_logits)
    cli_error(capsys, "perplexity", "--model", stories_dir, "--backend", "numpy", "--text", text,
              "--kl-base", base_logits, words=(base_logits.name, *words))
