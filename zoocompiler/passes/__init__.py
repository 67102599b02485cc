"""Graph passes, in two layers.

* :mod:`.analysis` annotates a GraphModule in place (idempotent): shapes, costs, cut points,
  unit groups, plans, activations.
* :mod:`.rewrite` returns a new module and leaves its input untouched: prune, pad, fuse,
  extract/stitch/compose blocks, slice.

Rewrite passes may import analysis passes, never the reverse (``make lint`` checks it).
"""
