"""The cluster primitives of kernels/common/cluster.cuh on their own (kernels/common/cluster_test.cu).

Each block r of one cluster of C blocks holds row r of `inputs` [C, n]. Expected results are
folds in rank order in fp32, so the kernel must match them bit for bit (a + b rounds the same
on every IEEE device; max is exact), on every block.
"""

import ctypes

import pytest
import torch

from neoxfuse import _lib
from neoxfuse.errors import KernelError

MAX_N = 4096  # cluster_test.cu: kTestMaxN
# Run again under compute-sanitizer by the GPU pipeline (conftest.py): uneven slices, every cluster size.
SANITIZE = ("test_cluster_primitives_match_a_rank_order_fold_bitwise[80-*]",)


_ARGTYPES = [ctypes.c_void_p] * 5 + [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]


def _cluster_test_fn():
    return _lib.function("neoxfuse_cluster_test", _ARGTYPES)


def _split_range(n: int, parts: int, part: int) -> range:
    """cluster.cuh: split_range — the first n % parts slices get one element more."""
    base, extra = divmod(n, parts)
    begin = part * base + min(part, extra)
    return range(begin, begin + base + (1 if part < extra else 0))


def _run(inputs: torch.Tensor, emulated=None):
    """sum, max, gathered [C, n] and scattered [n] from the kernel, every output poisoned first: on
    the GPU, or on the CPU through the `emulated` library (conftest.py) when given one."""
    ranks, n = inputs.shape
    sum_out, max_out, gathered = (torch.full_like(inputs, float("nan")) for _ in range(3))
    scattered = torch.full((n,), float("nan"), device=inputs.device)
    pointers = (inputs.data_ptr(), sum_out.data_ptr(), max_out.data_ptr(), gathered.data_ptr(), scattered.data_ptr())
    if emulated is not None:
        emulated.call("neoxfuse_cluster_test", _ARGTYPES, *pointers, n, ranks, None)
    else:
        _lib.call(_cluster_test_fn(), *pointers, n, ranks, torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
    return sum_out, max_out, gathered, scattered


def _fold_in_rank_order(inputs: torch.Tensor, op) -> torch.Tensor:
    acc = inputs[0].clone()
    for row in inputs[1:]:
        acc = op(acc, row)
    return acc


def _inputs(cluster_size: int, n: int, device: str) -> torch.Tensor:
    """[C, n] with spread magnitudes, so a sum in another order would round differently."""
    return torch.randn(cluster_size, n, device=device) * torch.logspace(-3, 3, n, device=device)


def _check_against_folds(inputs: torch.Tensor, outputs) -> None:
    sum_out, max_out, gathered, scattered = outputs
    cluster_size, n = inputs.shape
    want_sum = _fold_in_rank_order(inputs, torch.add)  # [n]
    want_max = _fold_in_rank_order(inputs, torch.maximum)
    want_gather = torch.empty(n, device=inputs.device)
    for rank in range(cluster_size):
        part = _split_range(n, cluster_size, rank)
        want_gather[part.start : part.stop] = inputs[rank, part.start : part.stop]

    for rank in range(cluster_size):  # every block sees the same, bit for bit
        assert torch.equal(sum_out[rank], want_sum), f"sum, block {rank}"
        assert torch.equal(max_out[rank], want_max), f"max, block {rank}"
        assert torch.equal(gathered[rank], want_gather), f"gather, block {rank}"
    assert torch.equal(scattered, want_sum), "reduce-scatter: each block reduces its own slice"


@pytest.mark.gpu
@pytest.mark.parametrize("cluster_size", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [1, 3, 80, 1000, MAX_N])
def test_cluster_primitives_match_a_rank_order_fold_bitwise(cluster_size, n):
    inputs = _inputs(cluster_size, n, "cuda")
    _check_against_folds(inputs, _run(inputs))


@pytest.mark.parametrize("cluster_size", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [1, 3, 80, 1000, MAX_N])
def test_emulated_cluster_primitives_match_a_rank_order_fold_bitwise(emulated, cluster_size, n):
    inputs = _inputs(cluster_size, n, "cpu")
    _check_against_folds(inputs, _run(inputs, emulated))
    with emulated.reverse_schedule():
        _check_against_folds(inputs, _run(inputs, emulated))


@pytest.mark.gpu
def test_cluster_reduce_is_deterministic_across_runs():
    inputs = torch.randn(8, 1000, device="cuda")
    first = _run(inputs)
    for _ in range(3):
        for got, want in zip(_run(inputs), first):
            assert torch.equal(got, want)


def test_split_range_is_balanced_and_covers_every_index():
    for n in [0, 1, 7, 80, 240, 2049]:
        for parts in range(1, 9):
            slices = [_split_range(n, parts, p) for p in range(parts)]
            assert [i for s in slices for i in s] == list(range(n))
            assert max(map(len, slices)) - min(map(len, slices)) <= 1


@pytest.mark.gpu
@pytest.mark.parametrize("n, cluster_size", [(0, 2), (MAX_N + 1, 2), (16, 0), (16, 9)])
def test_cluster_test_launcher_refuses_bad_sizes(n, cluster_size):
    buffer = torch.zeros(8 * (MAX_N + 1), device="cuda")
    ptr = buffer.data_ptr()
    with pytest.raises(KernelError, match="invalid argument"):
        _lib.call(_cluster_test_fn(), ptr, ptr, ptr, ptr, ptr, n, cluster_size, torch.cuda.current_stream().cuda_stream)


def test_cluster_test_launcher_refuses_null_pointers():
    # Checked before any CUDA call, so this runs on machines without a GPU too.
    with pytest.raises(KernelError, match="invalid argument"):
        _lib.call(_cluster_test_fn(), None, None, None, None, None, 16, 2, None)
