"""Solvers: optimisation over plain data (arrays, costs), never GraphModules.

* ``cka`` — linear CKA (biased and unbiased) and the all-pairs CKA matrix.
* ``partition`` — DeRy's partition of every model into K blocks and K equivalence sets (exact DP or
  Kernighan–Lin swaps, k-medoids anchors, seeded restarts).
* ``assembly_ilp`` — the assembly integer program (PuLP + CBC) with budgets and top-M no-good cuts.
* ``naswot`` — NASWOT's Hamming kernel and log-det score of binary sign codes (the codes come from the
  ``passes.analysis.preactivations`` pass; ``pipelines.assemble.naswot`` joins the two to re-rank assemblies).
* ``slice_rates`` — valid slice-rate grids, snapping, and the Eq. 10 rate schedulers.
"""
