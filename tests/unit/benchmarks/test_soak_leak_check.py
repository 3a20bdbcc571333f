"""benchmarks/soak_multigpu.py's leak measure: growth of the highest allocation between the two
halves of the run. A load-dependent wobble (what a forward leaves allocated until the next) does
not count; memory that grows with the steps does."""

import random

from tests.benchmark_scripts import load_benchmark_script


def _soak():
    return load_benchmark_script("soak_multigpu")


def test_a_wobble_with_the_load_is_no_leak_and_growth_is():
    soak = _soak()
    rng = random.Random(3)
    base = 8 << 30
    wobble = [base + rng.choice((-904_704, -150_528, 68_608, 1_061_376)) for _ in range(1000)]
    wobble[10] = base + 1_061_376  # the highest one early
    assert soak.allocation_growth(wobble) <= 0
    assert soak.allocation_growth(wobble) <= soak.MAX_GROWTH_BYTES
    leaking = [a + 512 * step for step, a in enumerate(wobble)]  # 512 B per forward
    assert soak.allocation_growth(leaking) > soak.MAX_GROWTH_BYTES


def test_short_runs():
    soak = _soak()
    assert soak.allocation_growth([5]) == 0
    assert soak.allocation_growth([5, 9]) == 4
