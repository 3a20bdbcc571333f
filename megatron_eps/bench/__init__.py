"""Benchmark- and test-only helpers (the single-GPU link emulator). The core never imports this
package (tests/unit/test_import_graph.py checks it)."""
