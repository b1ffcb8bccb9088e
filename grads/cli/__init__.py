"""The console scripts, the top layer: nothing in the library imports them.

* :mod:`~grads.cli.main`: ``grads`` (the Hydra app whose job is :func:`grads.pipeline.run`);
* :mod:`~grads.cli.select`: ``grads-select`` (warm-up, features, select and export);
* :mod:`~grads.cli.cache`: ``grads-cache ls|verify|gc``;
* the others, one module each, where the package has them (``grads-config``, ``grads-verdict``).

``grads-report`` is :func:`grads.paper.tables.main`.
"""
