"""Benchmark- and test-only helpers (the single-GPU link emulator). The core never imports this
package (tests/unit_tests/test_import_graph.py checks it)."""
