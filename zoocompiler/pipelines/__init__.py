"""Pipelines: end-to-end recipes (assemble, slice, ...) composed from sources, passes, solvers and exports.

Passes and solvers never import pipelines; pipelines may import everything below them.
"""
