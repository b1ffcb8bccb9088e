"""DeepSpeed-backed SFT trainer, used twice by GrADS (arXiv 2511.08620).

* ``warmup``: the paper's preliminary epoch over the whole domain pool. Its model feeds the
  gradient-features stage, which reads Embedding and LM-head gradients, so the warm-up always
  exports a full (LoRA-merged) Hugging Face model.
* ``finetune``: from the base model again, on the ids chosen by a selector.

One implementation serves both: ``run_train(cfg, use, out_dir, ids, pool)`` merges ``cfg[use]``
(``epochs``/``max_steps``, or any other trainer knob) over ``cfg["trainer"]``. Every run goes
through ``deepspeed.initialize`` (CPU with ``DS_ACCELERATOR=cpu``, CUDA otherwise); the JSON files
under ``conf/trainer/ds/`` are templates whose ``"auto"`` fields are filled from the trainer knobs.

Loss normalisation: each optimizer step's loss is the mean over *all* supervised tokens of the
global batch (sum of token losses / supervised tokens in the global batch), not a mean of per-micro-
batch means. This makes the update independent of how the global batch is split into micro-batches
and ranks, which is what lets 2 processes reproduce the 1-process loss curve.

Output layout of ``out_dir``::

    model/               full HF model (safetensors) + tokenizer. Always for full fine-tuning and
                         for the warm-up; for LoRA fine-tunes only with ``save_merged: true``.
                         Load with ``grads.models.load_model(cfg.model, path=out_dir / "model")``.
    adapter/             PEFT LoRA adapter + tokenizer (``mode: lora`` only).
    checkpoints/         resumable state: ``step_XXXXXXXX/`` folders and a ``latest`` pointer
                         (deleted at the end unless ``trainer.clean_checkpoints: false``).
    train_log.jsonl      one row per optimizer step: step, epoch, loss, lr, tokens, padded_tokens,
                         padding_efficiency (real / padded tokens), tokens/s, time, grad_norm.
    train_summary.json   written last; its presence marks a completed run. Keys include steps,
                         tokens, wall_time_s (training loop, summed over resumed segments),
                         run_time_s (this invocation incl. load/export), loop_cpu_s (process CPU
                         time of this segment's loop), first_loss, final_loss, padding_efficiency,
                         model_dir / adapter_dir ("model" / "adapter" or null: relative to the
                         run folder, so a pipeline may rename it), resumed_from_step, fingerprint.
    ds_config.json       the filled DeepSpeed config, for provenance.
    warmup_ids.json      warm-up on a subset (``warmup.fraction`` / ``warmup.max_samples``): the
                         seeded subset's ids and knobs (see ``warmup_subset``).
    pool.arrow           warm-up only: the tokenised pool it trained from (a memory-mapped Arrow
    pool.json            store, ``grads.data.pool.load_pool``) and its counts; the stages after
                         the warm-up open it instead of tokenising the pool again.
    features.parquet     warm-up with ``features.source: warmup``: the features table recorded from
    features.json        the warm-up's own steps (``FeatureRecording``), same schema as the features stage.

Batches: with ``group_by_length`` (default) each global batch holds samples of similar length
(``length_grouped_batches``), in shuffled order, so micro-batches pad little; the plan depends on
the seed and the global batch only, so resume and the 1-vs-N-process equivalence are unchanged.

The features stage should load ``out_dir/model`` (``train_summary.json["model_dir"]``, relative to
``out_dir``) with ``load_model(cfg.model, path=out_dir / "model")``: a plain Hugging Face model with
the LoRA update merged in, so Embedding / LM-head gradients need no peft. ``load_trained(cfg.model,
out_dir)`` does the same and falls back to base + adapter for LoRA fine-tunes without a merged copy.

The package, one module per concern (:mod:`~grads.training.recipe` assembles them)::

    settings     TrainerSettings / LoraSettings (the schema of conf/trainer + conf/tuning), layout names
    ds_config    DeepSpeed JSON templates and their "auto" fields
    schedule     warm-up + cosine lr schedule, epoch permutation, length grouping, BatchPlan
    model        LoRA / full preparation, AdamW groups, load_trained
    data         rows to train on, the warm-up subset, the warm-up's features recording
    steps        token_loss_sum, one optimizer step, the step loop with logging and checkpoints
    checkpoints  atomic resumable checkpoints (engine + RNG state)
    distributed  process group, DeepSpeed import and engine, all-reduce
    export       adapter / merged / full model, written atomically
    recipe       run_train: setup -> resume -> loop -> export; train: one or N processes
"""

from __future__ import annotations

from grads.training.checkpoints import Checkpoints
from grads.training.data import warmup_subset
from grads.training.distributed import build_engine
from grads.training.ds_config import fill_ds_config, load_ds_template
from grads.training.model import load_trained, param_groups, prepare_model
from grads.training.recipe import run_train, train
from grads.training.schedule import (
    BatchPlan,
    cosine_schedule,
    epoch_permutation,
    length_grouped_batches,
    make_scheduler,
    warmup_steps_for,
)
from grads.training.settings import (
    ADAPTER_DIR,
    CKPT_DIR,
    DS_CONFIG_NAME,
    LOG_NAME,
    MODEL_DIR,
    SUMMARY_NAME,
    USES,
    WARMUP_IDS_NAME,
    LoraSettings,
    TrainerSettings,
)
from grads.training.steps import supervised_count, token_loss_sum

__all__ = [
    "ADAPTER_DIR",
    "CKPT_DIR",
    "DS_CONFIG_NAME",
    "LOG_NAME",
    "MODEL_DIR",
    "SUMMARY_NAME",
    "USES",
    "WARMUP_IDS_NAME",
    "BatchPlan",
    "Checkpoints",
    "LoraSettings",
    "TrainerSettings",
    "build_engine",
    "cosine_schedule",
    "epoch_permutation",
    "fill_ds_config",
    "length_grouped_batches",
    "load_ds_template",
    "load_trained",
    "make_scheduler",
    "param_groups",
    "prepare_model",
    "run_train",
    "supervised_count",
    "token_loss_sum",
    "train",
    "warmup_steps_for",
    "warmup_subset",
]
