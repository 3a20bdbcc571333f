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
            # Triton's compiled kernel reads all three grid dimensions.
            self.log.append(("direct", (grid[0], grid[1], grid[2]), args))

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
    assert jit.log[1] == ("direct", (3, 1, 1), (x, 48, 0.25, 128))
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


def test_a_failing_direct_call_falls_back_to_the_jit_for_good(caplog):
    jit = FakeJit(fail_direct=True)
    launch = CachedLauncher(jit)
    x = torch.zeros(64)
    for _ in range(3):
        launch((1,), (x, 32), {"BLOCK": 128}, num_warps=4)
    assert [e[0] for e in jit.log] == ["jit", "jit", "jit"]
    assert not launch.direct
    assert "launcher API changed" in caplog.text


class FakeDescriptor:
    def __init__(self, base, block_shape):
        self.base, self.block_shape = base, block_shape


def test_tma_descriptors_are_keyed_by_dtype_and_block_shape():
    jit = FakeJit()
    launch = CachedLauncher(jit)
    x = torch.zeros(64, 64)
    launch((1,), (FakeDescriptor(x, [16, 16]),), {"B": 1})
    launch((1,), (FakeDescriptor(x.clone(), [16, 16]),), {"B": 1})  # same key: another tensor
    launch((1,), (FakeDescriptor(x, [32, 16]),), {"B": 1})
    launch((1,), (FakeDescriptor(x.double(), [16, 16]),), {"B": 1})
    assert [e[0] for e in jit.log] == ["jit", "direct", "jit", "jit"]


def test_compiled_kernels_lists_one_kernel_per_specialization():
    launch = CachedLauncher(FakeJit())
    x = torch.zeros(64)
    for n in (32, 48, 33):
        launch((1,), (x, n), {"BLOCK": 128})
    assert len(launch.compiled_kernels()) == 2


class FakeAsyncCompile:
    """Stands in for triton.runtime._async_compile: warmup submits the compile to the mode's
    executor and returns a FutureKernel."""

    def __init__(self):
        import contextvars

        self.active_mode = contextvars.ContextVar("fake_mode", default=None)

        class FutureKernel:
            def __init__(self, future):
                self.future, self.kernel = future, None

            def result(self):
                self.kernel = self.future.result()
                return self.kernel

        class AsyncCompileMode:
            def __init__(self, executor):
                self.executor = executor

        self.FutureKernel, self.AsyncCompileMode = FutureKernel, AsyncCompileMode


class FakeCompilingJit(FakeJit):
    def __init__(self, fake_module, compiled="compiled kernel"):
        super().__init__()
        self.fake_module, self.compiled = fake_module, compiled

    def warmup(self, *args, grid, **kwargs):
        mode = self.fake_module.active_mode.get()
        return self.fake_module.FutureKernel(mode.executor.submit(lambda: self.compiled))


def test_a_background_compile_builds_the_launcher_after_the_kernel(monkeypatch):
    from megatron_eps import triton_launch

    fake = FakeAsyncCompile()
    built = []
    monkeypatch.setattr(triton_launch, "_async_compile", lambda: fake)
    monkeypatch.setattr(triton_launch, "_build_launcher", lambda future: built.append(future.result()))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    jit = FakeCompilingJit(fake)
    launch = CachedLauncher(jit)
    with triton_launch.compile_in_background() as started:
        launch((1,), (torch.zeros(4), 32), {"BLOCK": 128}, num_warps=4)
    assert jit.log == []  # nothing launched
    started.wait()
    assert started.done() and len(started.kernels) == 1 and len(started.launchers) == 1
    assert built == ["compiled kernel"]


def test_a_failing_launcher_build_leaves_it_to_the_first_launch(monkeypatch):
    from megatron_eps import triton_launch

    fake = FakeAsyncCompile()

    def failing_build(future):
        raise RuntimeError("no C compiler")

    monkeypatch.setattr(triton_launch, "_async_compile", lambda: fake)
    monkeypatch.setattr(triton_launch, "_build_launcher", failing_build)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    launch = CachedLauncher(FakeCompilingJit(fake))
    with triton_launch.compile_in_background() as started:
        launch((1,), (torch.zeros(4), 32), {"BLOCK": 128}, num_warps=4)
    started.wait()  # does not raise
    assert started.done()
