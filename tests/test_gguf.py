"""`tinyserve convert gguf`: llama.cpp GGUF files (Llama architecture, F32/F16/BF16/Q8_0/Q4_0) -> HF directory.

The shared stories260K.gguf (all F32) must give the same model as the llama2.c import of the same weights.
Quantized files are written here with the `gguf` package itself (llama.cpp's Python quantizer): the importer
must keep their numbers exactly (never re-quantize), and the model must compute what a float model built
from gguf's own dequantization computes.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from tiny_models import SHARED, STORIES

gguf = pytest.importorskip("gguf")

import tinyserve  # noqa: E402
from tinyserve.checkpoint import Checkpoint  # noqa: E402
from tinyserve.convert.common import permute_rotary_rows  # noqa: E402
from tinyserve.convert.gguf import convert_gguf  # noqa: E402
from tinyserve.errors import TinyserveError  # noqa: E402
from tinyserve.quant import dequantize, read_quantized, to_q4_0, to_q8_0  # noqa: E402

SRC = STORIES / "stories260K.gguf"
CORPUS = SHARED / "corpora" / "tinystories_val.txt"
EXPECTED_IDS = json.loads((STORIES / "expected_greedy200_ids.json").read_text()) if STORIES.is_dir() else []
Q = gguf.GGMLQuantizationType
V = gguf.GGUFValueType
N_HEADS, N_KV_HEADS = 8, 4  # stories260K

pytestmark = pytest.mark.skipif(not SRC.is_file(), reason=f"{SRC} not found")


# ------------------------------------------------------------------------------------ writing GGUF files
def write_gguf(dst, tensor_fn=None, meta=None, drop_meta=(), drop=(), arch="llama"):
    """Copy stories260K.gguf to `dst` with changes.

    tensor_fn(name, float32 array) -> (array to write, GGMLQuantizationType or None for plain F32/F16);
    meta: {key: (value, GGUFValueType[, array item type])} added or replaced; drop_meta / drop: keys and
    tensors left out; arch: general.architecture.
    """
    src = gguf.GGUFReader(SRC)
    w = gguf.GGUFWriter(str(dst), arch)
    meta = dict(meta or {})
    for name, field in src.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop_meta or name in meta:
            continue
        sub = field.types[-1] if field.types[0] == V.ARRAY else None
        w.add_key_value(name, field.contents(), field.types[0], sub_type=sub)
    for name, (value, vtype, *sub) in meta.items():
        w.add_key_value(name, value, vtype, sub_type=sub[0] if sub else None)
    for t in src.tensors:
        if t.name in drop:
            continue
        arr = np.array(t.data, dtype=np.float32)
        data, qtype = tensor_fn(t.name, arr) if tensor_fn else (arr, None)
        w.add_tensor(t.name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def quantizer(qtype):
    """Quantize every matrix whose rows are whole 32-value blocks, as llama.cpp does (ffn_down, 172, stays F32)."""

    def fn(name, arr):
        if arr.ndim == 2 and arr.shape[1] % 32 == 0:
            return gguf.quants.quantize(arr, qtype), qtype
        return arr, None

    return fn


def dequantized(path):
    """tensor_fn that writes gguf's own dequantization of the tensors of the GGUF file at `path`, as F32."""
    reader = gguf.GGUFReader(path)
    src = {t.name: t for t in reader.tensors}

    def fn(name, arr):
        t = src[name]
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32), None

    return fn


def paragraphs(n):
    text = CORPUS.read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()][:n]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tinyserve", *map(str, args)], capture_output=True, text=True)


# ------------------------------------------------------------------------------------ the F32 file
@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    return convert_gguf(SRC, tmp_path_factory.mktemp("gguf") / "stories260K")


def test_config_from_metadata(gguf_dir):
    cfg = json.loads((gguf_dir / "config.json").read_text())
    assert cfg["hidden_size"] == 64 and cfg["intermediate_size"] == 172 and cfg["num_hidden_layers"] == 5
    assert cfg["num_attention_heads"] == 8 and cfg["num_key_value_heads"] == 4 and cfg["head_dim"] == 8
    assert cfg["vocab_size"] == 512 and cfg["max_position_embeddings"] == 2048
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 10000.0 and cfg["rope_scaling"] is None
    assert cfg["tie_word_embeddings"] is False  # the file has its own output.weight
    gen = json.loads((gguf_dir / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 1 and gen["eos_token_id"] == 2
    assert "tinyserve_quant" not in Checkpoint(gguf_dir).metadata


def test_same_model_as_llama2c_import(gguf_dir, stories_dir):
    ours, ref = tinyserve.load(gguf_dir, backend="numpy"), tinyserve.load(stories_dir, backend="numpy")
    paras = paragraphs(30)
    for p in paras:
        assert ours.tokenizer.encode(p) == ref.tokenizer.encode(p), p
    ids = ref.tokenizer.encode("\n\n".join(paras))[:300]
    assert len(ids) == 300
    np.testing.assert_allclose(ours.logits(ids), ref.logits(ids), rtol=0, atol=1e-5)


def test_greedy_200(gguf_dir):
    out = tinyserve.load(gguf_dir, backend="numpy").generate("", max_new_tokens=200, temperature=0.0)[0]
    assert out.token_ids == EXPECTED_IDS


def test_spaces_are_kept_as_llama_cpp_does(gguf_dir):
    tok = tinyserve.load(gguf_dir, backend="numpy").tokenizer
    sp = tok.hf.token_to_id("\u2581")
    assert tok.encode("a  b").count(sp) == 1  # "▁a", "▁", "▁b": llama.cpp does not collapse runs of spaces


# ------------------------------------------------------------------------------------ F16 / BF16 files
@pytest.mark.parametrize("kind", ["F16", "BF16"])
def test_half_precision_files(kind, gguf_dir, tmp_path):
    def fn(name, arr):
        if kind == "F16":
            return arr.astype(np.float16), None
        return gguf.quants.quantize(arr, Q.BF16), Q.BF16

    out = convert_gguf(write_gguf(tmp_path / "m.gguf", fn), tmp_path / "out")
    ours, ref = Checkpoint(out), Checkpoint(gguf_dir)
    assert sorted(ours.location) == sorted(ref.location)
    for name in ref.location:
        want = ref.get(name)
        if kind == "F16":
            want = want.astype(np.float16).astype(np.float32)
        else:
            want = np.asarray(gguf.quants.dequantize(gguf.quants.quantize(want, Q.BF16), Q.BF16), dtype=np.float32)
        got = ours.get(name)
        assert got.dtype == np.float32 and np.array_equal(got, want), name


# ------------------------------------------------------------------------------------ Q8_0 / Q4_0 files
@pytest.fixture(scope="module", params=["Q8_0", "Q4_0-tied"])
def quantized(request, tmp_path_factory):
    """(GGUF path, converted dir, float model dir from gguf's dequantization, tied). Q4_0 also drops
    output.weight, so that the model is tied and its quantized token_embd is the output head as well."""
    qname = request.param.split("-")[0]
    tied = request.param.endswith("tied")
    d = tmp_path_factory.mktemp(qname)
    path = write_gguf(d / f"{qname}.gguf", quantizer(Q[qname]), drop=["output.weight"] if tied else ())
    out = convert_gguf(path, d / "q")
    ref = convert_gguf(write_gguf(d / "deq.gguf", dequantized(path), drop=["output.weight"] if tied else ()), d / "f")
    return path, out, ref, tied


HF_OF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj"}


def test_quantized_tensors_are_gguf_numbers_exactly(quantized):
    path, out, _, tied = quantized
    ckpt = Checkpoint(out)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    qtype = tensors["blk.0.attn_q.weight"].tensor_type
    assert ckpt.metadata["tinyserve_quant"] == ("int8 g32" if qtype == Q.Q8_0 else "int4 g32")
    checked = 0
    for name, t in tensors.items():
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
        if not m or m.group(2) not in HF_OF:
            continue
        assert t.tensor_type == qtype, name
        hf = f"model.layers.{m.group(1)}.{HF_OF[m.group(2)]}.weight"
        qt = read_quantized(ckpt, hf, t.data.shape[:1] + (int(t.shape[0]),))
        assert qt.group_size == 32 and qt.bits == (8 if qtype == Q.Q8_0 else 4) and qt.zeros is None
        want = gguf.quants.dequantize(t.data, qtype)
        if m.group(2) in ("attn_q", "attn_k"):
            want = permute_rotary_rows(want, N_HEADS if m.group(2) == "attn_q" else N_KV_HEADS)
        else:  # unpermuted tensors are the file's very bytes
            assert np.array_equal((to_q8_0 if qtype == Q.Q8_0 else to_q4_0)(qt), np.asarray(t.data).reshape(-1))
        assert np.array_equal(dequantize(qt), want), name  # bit for bit
        checked += 1
    assert checked == 5 * 6
    assert "model.layers.0.mlp.down_proj.weight_scale" not in ckpt  # rows of 172: kept F32, as llama.cpp does
    emb = tensors["token_embd.weight"]
    assert np.array_equal(ckpt.get("model.embed_tokens.weight"), gguf.quants.dequantize(emb.data, qtype))
    head = read_quantized(ckpt, "lm_head.weight", (512, 64))  # tied: the quantized copy of token_embd
    src_head = emb if tied else tensors["output.weight"]
    assert np.array_equal(dequantize(head), gguf.quants.dequantize(src_head.data, qtype))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is tied


def test_quantized_model_computes_like_dequantized_float_model(quantized):
    _, out, ref, _ = quantized
    q, f = tinyserve.load(out, backend="numpy"), tinyserve.load(ref, backend="numpy")
    assert q.quant in ("int8 g32", "int4 g32")
    ids = f.tokenizer.encode("\n\n".join(paragraphs(10)))[:200]
    np.testing.assert_allclose(q.logits(ids), f.logits(ids), rtol=0, atol=1e-5)


def test_quantized_generation_stays_fluent(quantized):
    _, out, _, _ = quantized
    llm = tinyserve.load(out, backend="numpy")
    text = llm.generate("Once upon a time", max_new_tokens=120, temperature=0.0)[0].text
    known = set(re.findall(r"[a-z]+", CORPUS.read_text(encoding="utf-8").lower()))
    words = re.findall(r"[a-z]+", text.lower())
    assert len(words) >= 40, text
    assert sum(w in known for w in words) / len(words) >= 0.95, text


# ------------------------------------------------------------------------------------ other files
def test_tokenizer_settings_and_chat_template(tmp_path):
    meta = {"tokenizer.ggml.add_bos_token": (False, V.BOOL), "tokenizer.chat_template": ("{{ messages }}", V.STRING),
            "llama.rope.scaling.type": ("linear", V.STRING), "llama.rope.scaling.factor": (2.0, V.FLOAT32),
            "llama.rope.freq_base": (500000.0, V.FLOAT32)}
    out = convert_gguf(write_gguf(tmp_path / "m.gguf", meta=meta), tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 2.0} and cfg["rope_theta"] == 500000.0
    llm = tinyserve.load(out, backend="numpy")
    assert llm.tokenizer.encode("Once")[0] != 1  # no BOS
    assert llm.tokenizer.chat_template == "{{ messages }}"


def gguf_error(tmp_path, **changes):
    with pytest.raises(TinyserveError) as e:
        convert_gguf(write_gguf(tmp_path / "bad.gguf", **changes), tmp_path / "out")
    msg = str(e.value)
    assert "\n" not in msg and not (tmp_path / "out").exists()
    return msg


def test_refusals(tmp_path):
    def retype(target, qtype):
        def fn(name, arr):
            if name == target:
                return gguf.quants.quantize(arr, qtype), qtype
            return arr, None

        return fn

    assert "Q4_1" in gguf_error(tmp_path, tensor_fn=retype("blk.1.attn_v.weight", Q.Q4_1))
    assert "blk.2.ffn_norm.weight is Q8_0" in gguf_error(tmp_path, tensor_fn=lambda n, a: (
        (gguf.quants.quantize(a, Q.Q8_0), Q.Q8_0) if n == "blk.2.ffn_norm.weight" else (a, None)))
    assert "'gpt2'" in gguf_error(tmp_path, meta={"tokenizer.ggml.model": ("gpt2", V.STRING)})
    assert "yarn" in gguf_error(tmp_path, meta={"llama.rope.scaling.type": ("yarn", V.STRING)})
    assert "blk.3.ffn_up.weight" in gguf_error(tmp_path, drop=["blk.3.ffn_up.weight"])
    assert "llama.block_count" in gguf_error(tmp_path, drop_meta=["llama.block_count"])
    assert "blk.4.attn_q.weight" in gguf_error(tmp_path, meta={"llama.block_count": (4, V.UINT32)})  # one too many
    assert "shape" in gguf_error(tmp_path, meta={"llama.feed_forward_length": (160, V.UINT32)})


def test_rope_freqs_refused(tmp_path):
    src = tmp_path / "m.gguf"
    write_gguf(src)
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    for name, field in r.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":
            w.add_key_value(name, field.contents(), field.types[0],
                            sub_type=field.types[-1] if field.types[0] == V.ARRAY else None)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data))
    w.add_tensor("rope_freqs.weight", np.ones(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(TinyserveError, match="rope_freqs"):
        convert_gguf(tmp_path / "bad.gguf", tmp_path / "out")


def test_needs_the_gguf_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(TinyserveError, match=r"pip install 'tinyserve\[gguf\]'"):
        convert_gguf(SRC, tmp_path / "out")


def test_existing_output_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(TinyserveError, match="not empty"):
        convert_gguf(SRC, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


# ------------------------------------------------------------------------------------ through the CLI
def test_cli_converts(tmp_path):
    r = run_cli("convert", "gguf", SRC, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("case", ["missing", "truncated", "truncated-header", "not-gguf", "arch", "q5_0"])
def test_cli_bad_input(case, tmp_path):
    bad = tmp_path / "bad.gguf"
    words = []
    if case == "missing":
        words = ["not found"]
    elif case.startswith("truncated"):
        data = SRC.read_bytes()
        bad.write_bytes(data[: len(data) - 1000] if case == "truncated" else data[:5000])
        words = ["truncated or corrupt"]
    elif case == "not-gguf":
        bad.write_bytes(b"\x00" * 100)
        words = ["not a gguf file"]
    elif case == "arch":
        write_gguf(bad, arch="gpt2")
        words = ["'gpt2'", "not supported"]
    else:
        write_gguf(bad, quantizer(Q.Q5_0))
        words = ["Q5_0"]
    (tmp_path / "outs").mkdir()
    out = tmp_path / "outs" / "model"
    r = run_cli("convert", "gguf", bad, "--out", out)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinyserve: error:"), r.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
    assert list((tmp_path / "outs").iterdir()) == []  # no output directory, not even a partial one
