"""Atomic, resumable checkpoints: DeepSpeed engine state plus every rank's RNG state."""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


def _rng_state() -> dict:
    import numpy as np
    import torch

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpoints:
    """Atomic resumable checkpoints under ``root``.

    A checkpoint is written into ``root/.tmp-step_N`` by all ranks (DeepSpeed model/optimizer/
    scheduler state plus one RNG file per rank), completed by rank 0 with ``meta.json``, renamed to
    ``root/step_N`` (one ``os.replace``) and only then published by rewriting ``root/latest``
    atomically. A kill at any point leaves either the previous ``latest`` or the new one, never a
    pointer to a half-written folder; stale ``.tmp-*`` folders are ignored and deleted on start.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def clean_stale(self) -> None:
        for p in self.root.glob(".tmp-*"):
            log.warning("removing incomplete checkpoint %s", p)
            shutil.rmtree(p, ignore_errors=True)

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / "meta.json").exists():
            raise RuntimeError(
                f"{pointer} names {path.name}, which is incomplete: refusing to resume"
            )
        return path

    def save(
        self,
        engine,
        step: int,
        meta: dict,
        exclude_frozen: bool,
        rank: int,
        keep: int = 1,
        extra: dict | None = None,
    ) -> Path:
        """Write ``step_N`` (a collective); ``extra`` (rank 0's, picklable) goes to ``extra.pt``."""
        import torch

        from grads.dist import barrier
        from grads.io import write_json, write_text

        tag = f"step_{step:08d}"
        tmp, final = self.root / f".tmp-{tag}", self.root / tag
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        engine.save_checkpoint(
            str(tmp),
            tag="state",
            client_state={"step": step},
            save_latest=False,
            exclude_frozen_parameters=exclude_frozen,
        )
        torch.save(_rng_state(), tmp / f"rng_rank{rank:04d}.pt")
        barrier()
        if rank == 0:
            if extra is not None:
                torch.save(extra, tmp / "extra.pt")
            write_json(tmp / "meta.json", {**meta, "step": step})
            if final.exists():  # a completed-but-unpublished copy from a killed run
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_text(self.root / "latest", tag + "\n")
            self._prune(keep)
        barrier()
        return final

    def _prune(self, keep: int) -> None:
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        current = (self.root / "latest").read_text().strip()
        for p in done[:-keep]:
            if p.name != current:
                shutil.rmtree(p, ignore_errors=True)

    @staticmethod
    def extra(path: Path) -> dict:
        """The ``extra`` dict saved with checkpoint ``path`` (empty if none)."""
        import torch

        f = Path(path) / "extra.pt"
        return torch.load(f, weights_only=False) if f.exists() else {}

    def load(self, engine, path: Path, exclude_frozen: bool, rank: int) -> dict:
        """Restore engine state and this rank's RNG; returns ``meta.json``."""
        import torch

        from grads.io import read_json

        meta = read_json(path / "meta.json")
        load_path, _ = engine.load_checkpoint(
            str(path), tag="state", load_module_strict=not exclude_frozen
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
        rng = path / f"rng_rank{rank:04d}.pt"
        if rng.exists():
            # Our own file (python/numpy RNG tuples are not plain tensors).
            _set_rng_state(torch.load(rng, weights_only=False))
        else:
            log.warning(
                "no RNG state for rank %d in %s (world size changed?): reseeding", rank, path
            )
            from grads.dist import seed_everything

            seed_everything(int(meta["seed"]) + rank + int(meta["step"]))
        return meta
