"""Decisions from measurements: the per-GPU profile (the file, and the format of its kernel
tables), the chunk arithmetic, the plan (the only schedule) and the cost model that simulates
it, and the choice of the pipeline degree."""
