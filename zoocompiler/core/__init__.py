"""The bottom layer: pieces every other layer shares (errors, atomic files, budgets, counters,
JSON, caches, plots). Nothing here imports another zoocompiler package."""
