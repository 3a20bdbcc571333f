"""CachedLauncher: JIT on the first launch of a specialization, the compiled kernel after it."""

import torch

from megatron_eps.triton_launch import CachedLauncher


class FakeCompiled:
    def __init__(self, log, fail=False):
        self.log, self.fail = log, fail

    def __getitem__(self, grid):
        def run(*args):
            if self.fail:
                raise TypeError("launcher API changed")
            self.log.append(("direct", grid, args))

        return run


class FakeJit:
    def __init__(self, fail_direct=False):
        self.log, self.fail_direct = [], fail_direct

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("jit", grid, args, kwargs))
            return FakeCompiled(self.log, self.fail_direct)

        return run


def test_second_launch_of_a_specialization_skips_the_jit():
    jit = FakeJit()
    launch = CachedLauncher(jit)
    x = torch.zeros(64)
    launch((2,), (x, 32, 0.5), {"BLOCK": 128}, num_warps=4)
    launch((3,), (x, 48, 0.25), {"BLOCK": 128}, num_warps=4)  # same key: 48 % 16 == 0 too
    assert [e[0] for e in jit.log] == ["jit", "direct"]
    assert jit.log[1] == ("direct", (3,), (x, 48, 0.25, 128))
    assert jit.log[0][3] == {"BLOCK": 128, "num_warps": 4}


def test_a_new_specialization_goes_through_the_jit():
    jit = FakeJit()
    launch = CachedLauncher(jit)
    x = torch.zeros(64)
    launch((1,), (x, 32), {"BLOCK": 128}, num_warps=4)
    launch((1,), (x, 33), {"BLOCK": 128}, num_warps=4)  # not a multiple of 16
    launch((1,), (x, 1), {"BLOCK": 128}, num_warps=4)  # == 1
    launch((1,), (x[1:], 32), {"BLOCK": 128}, num_warps=4)  # 4-byte, not 16-byte aligned
    launch((1,), (x, 32), {"BLOCK": 64}, num_warps=4)  # another constexpr
    launch((1,), (x, 32), {"BLOCK": 128}, num_warps=8)  # another launch option
    launch((1,), (x.double(), 32), {"BLOCK": 128}, num_warps=4)  # another dtype
    assert [e[0] for e in jit.log] == ["jit"] * 7
    launch((1,), (x, 2**40), {"BLOCK": 128}, num_warps=4)  # needs 64 bits
    assert [e[0] for e in jit.log][-1] == "jit"


def test_a_failing_direct_call_falls_back_to_the_jit_for_good():
    jit = FakeJit(fail_direct=True)
    launch = CachedLauncher(jit)
    x = torch.zeros(64)
    for _ in range(3):
        launch((1,), (x, 32), {"BLOCK": 128}, num_warps=4)
    assert [e[0] for e in jit.log] == ["jit", "jit", "jit"]
    assert not launch.direct
