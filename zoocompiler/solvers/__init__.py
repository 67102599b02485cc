"""Solvers: optimisation over plain data (arrays, costs), never GraphModules.

* ``cka`` — linear CKA (biased and unbiased) and the all-pairs CKA matrix.
* ``partition`` — DeRy's partition of every model into K blocks and K equivalence sets (exact DP or
  Kernighan–Lin swaps, k-medoids anchors, seeded restarts).
* ``assembly_ilp`` — the assembly integer program (PuLP + CBC) with budgets and top-M no-good cuts.
* ``naswot`` — the training-free NASWOT proxy used to re-rank assemblies.
"""
