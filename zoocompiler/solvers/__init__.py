"""Solvers: optimisation over plain data (arrays, costs), never GraphModules.

Empty in this release: the partition and assembly solvers (DeRy) are the next milestone;
see docs/architecture.md for where they plug in.
"""
