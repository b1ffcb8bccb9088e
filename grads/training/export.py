"""Writing a finished run's model: the LoRA adapter, the merged or full model, atomically."""

from __future__ import annotations

from pathlib import Path

from grads.training.settings import ADAPTER_DIR, MODEL_DIR, TrainerSettings


def export_model(
    module,
    state: dict,
    tokenizer,
    s: TrainerSettings,
    model_cfg: dict,
    cache_dir: str | None,
    out: Path,
) -> dict:
    """Write ``adapter/`` (LoRA) and ``model/`` atomically; return their names under ``out``."""
    from grads.io import atomic_path

    paths = {"model_dir": None, "adapter_dir": None}
    if s.mode == "full":
        with atomic_path(out / MODEL_DIR) as tmp:
            module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        paths["model_dir"] = MODEL_DIR
        return paths
    with atomic_path(out / ADAPTER_DIR) as tmp:
        module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    paths["adapter_dir"] = ADAPTER_DIR
    if s.save_merged:
        # Merge into a fresh copy of the base: the trained module may be partitioned (ZeRO-3) and
        # must not be mutated; reloading the adapter also proves that the adapter is loadable.
        from peft import PeftModel

        from grads.models import load_model

        base, _ = load_model(model_cfg, cache_dir=cache_dir)
        merged = PeftModel.from_pretrained(base, out / ADAPTER_DIR).merge_and_unload()
        with atomic_path(out / MODEL_DIR) as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        paths["model_dir"] = MODEL_DIR
    return paths
