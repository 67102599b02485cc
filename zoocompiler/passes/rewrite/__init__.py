"""Rewrite passes: each returns a new GraphModule (or module) and leaves its input untouched."""
