"""Decisions from measurements: the per-GPU profile (schema, lookup, cache), the cost model
that simulates the plan, and the choice of the pipeline degree."""
