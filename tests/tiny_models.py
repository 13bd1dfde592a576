"""Tiny random Hugging Face checkpoints for tests, built from real hub configs.

Real checkpoints carry config.json as the hub has it (rope_theta + rope_scaling, head_dim, eos lists,
sliding_window, torch_dtype ...), not as a fresh save_pretrained writes it. So a tiny test model keeps
every key of a real config.json from ../shared/hf-configs and only shrinks the sizes (same GQA ratio),
gets random weights from transformers, and is written as safetensors (float32, float16 or bfloat16; one
file or sharded). The tokenizer is the stories260K one (vocab 512), converted by tinyserve.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared"
HF_CONFIGS = SHARED / "hf-configs"
STORIES = SHARED / "models" / "stories260K"


def real_config(name: str) -> dict:
    for p in (HF_CONFIGS / name / "config.json", HF_CONFIGS / "reconstructed" / name / "config.json"):
        if p.is_file():
            return json.loads(p.read_text())
    raise FileNotFoundError(name)


def shrink(cfg: dict, hidden=64, heads=8, layers=2, inter=96, vocab=512, **over) -> dict:
    """Same keys, tiny sizes; keeps the ratio of query heads to key/value heads."""
    cfg = dict(cfg)
    ratio = cfg.get("num_attention_heads", 1) // cfg.get("num_key_value_heads", cfg.get("num_attention_heads", 1))
    ratio = max(1, min(ratio, heads))
    cfg.update(
        hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads // ratio,
        num_hidden_layers=layers, intermediate_size=inter, vocab_size=vocab, bos_token_id=1, eos_token_id=2,
    )
    if "head_dim" in cfg:
        cfg["head_dim"] = hidden // heads
    if "max_window_layers" in cfg:
        cfg["max_window_layers"] = layers
    cfg.update(over)
    return cfg


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, dst / name)


def write_model(out: Path, config: dict, tokenizer_dir: Path, dtype="float32", shards=1, seed=0, std=0.15):
    """Random weights for `config` (kept verbatim as config.json) -> an HF model directory. Returns out."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    copy_tokenizer(tokenizer_dir, out)
    hf_cfg = AutoConfig.from_pretrained(out)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))
    sd = {k: v.detach().to(getattr(torch, dtype)).contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        sd.pop("lm_head.weight", None)
    names = sorted(sd)
    if shards == 1:
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            part = names[i::shards]
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: sd[k] for k in part}, str(out / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def hf_model(model_dir):
    """The same checkpoint in transformers (float32, eager attention): the outside reference."""
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    return m.eval()


def hf_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float().numpy()


def cli_error(capsys, *argv, words=()) -> str:
    """Run the tinyserve CLI in this process: it must exit with status 2 and print exactly one line on stderr
    (no traceback) holding each of `words` (case-insensitive). Returns that line."""
    from tinyserve import cli

    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
    return lines[0]
