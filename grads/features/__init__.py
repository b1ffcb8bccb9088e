"""The features layer: what the features stage computes and stores.

* :mod:`~grads.features.store`: the features table's columns and writer and the representation
  files (below ``grads.training``, which records the table during the warm-up, and below the
  selectors, which read both);
* :mod:`~grads.features.gradients`: exact per-sample gradient norms of the embedding and LM head;
* :mod:`~grads.features.compute`: the features pass over a pool (uses a trained model);
* :mod:`~grads.features.representations`: the targeted baselines' representation passes.

The package imports none of its modules: import each from where it lives.
"""
