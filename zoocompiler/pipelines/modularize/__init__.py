"""Modularizing while Training (paper 004): `zoocompile modularize train | extract | reuse`."""
