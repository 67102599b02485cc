"""Helpers shared by the test modules (``tests/`` is on ``sys.path``, so ``from helpers.x import y``).

Test modules import shared code from here only, never from one another:

* :mod:`helpers.architectures` — the core architecture matrix, each case built and traced once per process;
* :mod:`helpers.random_models` — hypothesis strategies for random nets;
* :mod:`helpers.pruning` — reference plans, parameter counts and snapshots for the prune / slicing tests;
* :mod:`helpers.cli` — assertions on the command line's errors and help;
* :mod:`helpers.reached` — counting the @given examples that reach their property's check.

``tests/models_for_tests.py`` stays at the top of ``tests/``: it is a model module that model specs name
(``python:models_for_tests:tiny_cnn``), not a helper.
"""
