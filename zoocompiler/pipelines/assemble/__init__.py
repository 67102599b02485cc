"""Deep Model Reassembly (DeRy): partition, assembly integer program, build, tune, export."""
