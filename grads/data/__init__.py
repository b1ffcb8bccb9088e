"""The data layer: domain pools and the other sample sets a run reads.

* :mod:`~grads.data.readers`: source files (or hub datasets) as rows, a bad row named;
* :mod:`~grads.data.records`: rows rendered into :class:`~grads.data.records.Record` pairs by the
  source's templates, decontamination;
* :mod:`~grads.data.pool`: a domain's train pool (dedup, held-out exclusion, ``pool_limit``),
  tokenisation with prompt masking, collation;
* :mod:`~grads.data.custom_pool`: a user's own pool (``domain=custom``);
* :mod:`~grads.data.synthetic`, :mod:`~grads.data.heldout`, :mod:`~grads.data.targets`: the generated
  domain, the held-out split, the target sets of the targeted baselines.

Import each module from where it lives. The package re-exports only what the evaluation task
loaders (``grads/evaluation/tasks/utils.py``) import from it: their bytes are hashed into every
evaluate stage's cache key, so they keep their imports.
"""

from grads.data.readers import BadRecordError
from grads.data.readers import read_jsonl_strict as _read_jsonl
from grads.data.records import is_heldout

__all__ = ["BadRecordError", "_read_jsonl", "is_heldout"]
