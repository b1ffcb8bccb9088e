"""Learning-rate schedule and the deterministic batch plan (which samples each optimizer step,
micro-step and rank trains on).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

from grads.training.settings import TrainerSettings


def cosine_schedule(
    total_steps: int, warmup_steps: int, min_ratio: float = 0.0
) -> Callable[[int], float]:
    """Linear warm-up then cosine decay, as an lr multiplier of the number of *completed* steps.

    Optimizer step ``s`` (1-based) uses ``s / warmup_steps`` while ``s <= warmup_steps``, then
    ``min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2`` with ``p = (s - warmup - 1) /
    (total - warmup)``: no step runs at lr 0, and the first decay step runs at the peak lr.
    """

    def ratio(done: int) -> float:
        s = done + 1
        if s <= warmup_steps:
            return s / warmup_steps
        p = min(1.0, (s - warmup_steps - 1) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))

    return ratio


def warmup_steps_for(s: TrainerSettings, total_steps: int) -> int:
    return math.ceil(s.warmup_ratio * total_steps)


def make_scheduler(optimizer, total_steps: int, warmup_steps: int, min_ratio: float = 0.0):
    """A ``LambdaLR`` over ``cosine_schedule`` (shared by the trainer and the bench's loop)."""
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, cosine_schedule(total_steps, warmup_steps, min_ratio))


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """Order of ``n`` samples in ``epoch``: a function of (seed, epoch) only, equal on all ranks."""
    import numpy as np

    return np.random.default_rng([int(seed), int(epoch)]).permutation(n).tolist()


def length_grouped_batches(
    perm: Sequence[int], lengths: Sequence[int], global_batch: int, window: int, rng_seed: list[int]
) -> list[list[int]]:
    """Global batches of similar length from one epoch's permutation (HF's ``group_by_length``).

    The permutation is cut into windows of ``window`` global batches; each window is sorted by
    length (longest first; the sort is stable, so ties keep the random order) and cut into
    batches; then the order of all batches is shuffled with ``rng_seed``. Every sample appears
    once; only the last window's last batch can be partial. Deterministic in its arguments.
    """
    import numpy as np

    size = max(1, int(window)) * global_batch
    batches: list[list[int]] = []
    for s in range(0, len(perm), size):
        chunk = sorted(perm[s : s + size], key=lambda i: -lengths[i])
        batches += [chunk[k : k + global_batch] for k in range(0, len(chunk), global_batch)]
    order = np.random.default_rng(rng_seed).permutation(len(batches))
    return [batches[j] for j in order]


@dataclasses.dataclass
class BatchPlan:
    """Deterministic assignment of samples to optimizer steps, micro-steps and ranks.

    Each epoch's samples are cut into global batches of ``global_batch``: consecutive slices of
    the epoch permutation, or, given ``lengths``, ``length_grouped_batches`` of it (batches of
    similar length in shuffled order, so less padding). Step ``t`` takes batch ``t %
    steps_per_epoch`` of epoch ``t // steps_per_epoch``; slot ``j = micro * world_size + rank`` of
    that batch is a contiguous chunk of ``micro_batch_size`` samples. The batches depend only on
    the seed, the lengths and the global batch, so any (procs, micro_batch_size, grad_accum) split
    with the same product trains on the same batches. One batch per epoch may be partial (no
    sample is dropped); slots left empty run a dummy forward with zero loss so collectives stay
    aligned across ranks.
    """

    n: int
    micro_batch_size: int
    grad_accum: int
    world_size: int
    seed: int
    lengths: Sequence[int] | None = None
    length_group_size: int = 50
    _batches: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.n / self.global_batch))

    def total_steps(self, epochs: float, max_steps: int) -> int:
        if max_steps and max_steps > 0:
            return int(max_steps)
        return max(1, math.ceil(epochs * self.steps_per_epoch))

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All global batches of ``epoch``, in step order."""
        if epoch not in self._batches:
            self._batches.clear()  # one epoch at a time: the order is recomputed cheaply on demand
            perm = epoch_permutation(self.n, self.seed, epoch)
            gb = self.global_batch
            if self.lengths is None:
                self._batches[epoch] = [perm[k : k + gb] for k in range(0, self.n, gb)]
            else:
                self._batches[epoch] = length_grouped_batches(
                    perm, self.lengths, gb, self.length_group_size, [int(self.seed), epoch, 1]
                )
        return self._batches[epoch]

    def step_batch(self, step: int) -> list[int]:
        """Positions (into the selected rows) of the global batch of optimizer step ``step``."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return self.epoch_batches(epoch)[k]

    def micro_batches(self, batch: Sequence[int], rank: int) -> list[list[int]]:
        mb, w = self.micro_batch_size, self.world_size
        return [
            list(batch[(m * w + rank) * mb : (m * w + rank + 1) * mb])
            for m in range(self.grad_accum)
        ]

    def padded_tokens(self, batch: Sequence[int], n_tok: Sequence[int]) -> int:
        """Tokens the global batch's micro-batches occupy once padded to their longest member."""
        mb = self.micro_batch_size
        slots = (batch[j : j + mb] for j in range(0, len(batch), mb))
        return sum(len(c) * max(n_tok[i] for i in c) for c in slots)

    def last_visits(self, total_steps: int) -> dict[int, int]:
        """Position -> the last step (< ``total_steps``) whose batch contains it."""
        last: dict[int, int] = {}
        for step in range(total_steps):
            for i in self.step_batch(step):
                last[i] = step
        return last
