"""Launch limits a GPU enforces and the interpreter does not (issue 13, item 2), checked at shapes no
CPU could run: the launchers run on meta tensors under a simulated H100 and every ``kernel[grid]``
is recorded instead of launched (fusedstab.kernels.introspect).

CUDA allows 2^31 - 1 programs on grid axis 0 and 65535 on axes 1 and 2; a kernel has at most 32
warps. GroupNorm on channels-inner input put the batch on axis 2, so N > 65535 failed at launch.
"""
from __future__ import annotations

import pytest
import torch

from fusedstab.kernels import common, introspect

LARGE = introspect.cases("large")


def _check(launch):
    for axis, (size, limit) in enumerate(zip(launch.grid, common.MAX_GRID)):
        assert 1 <= size <= limit, f"{launch.label}: {launch.name} grid {launch.grid}: axis {axis} over {limit}"
    assert launch.num_warps in (1, 2, 4, 8, 16, 32), f"{launch.label}: {launch.name} num_warps {launch.num_warps}"


@pytest.mark.parametrize("label,thunk", LARGE, ids=[c[0] for c in LARGE])
def test_grids_within_cuda_limits(label, thunk):
    for launch in introspect.run_cases([(label, thunk)]):
        _check(launch)


def test_group_norm_channels_last_batch_over_65535():
    """The reported case: channels_last GroupNorm at N = 70000 (per-sample BatchNorm kernels)."""
    (case,) = introspect.group_norm_cases([(70000, 64, 2, 2, 8, True)], [torch.bfloat16], acts=("none",))
    launches = introspect.run_cases([case])
    assert {launch.name for launch in launches} >= {"_stats_kernel", "_elemt_kernel", "_bwd_reduce_kernel",
                                                    "_bwd_elemt_kernel"}
    for launch in launches:
        _check(launch)


def test_group_norm_2d_input_runs_the_rows_kernels():
    """(N, C) input: one program per block of whole rows (no 2 x 64 tiles of one valid row)."""
    (case,) = introspect.group_norm_cases([(100000, 64, 8, False)], [torch.bfloat16], acts=("none",))
    names = [launch.name for launch in introspect.run_cases([case])]
    assert names == ["_rows_fwd_kernel", "_rows_bwd_kernel"]


def test_recorder_sees_what_would_run():
    """The recorder itself: a launch of a real size is recorded with its grid and runs nothing."""
    from fusedstab.kernels import batch_norm as KB

    x = torch.empty(4, 8, 3, device="meta")
    with common.simulate_gpu(), introspect.record_launches() as launches:
        KB.stats(x, False, torch.float32)
    assert [launch.name for launch in launches] == ["_stats_kernel"]
    assert launches[0].grid[0] == 8 and launches[0].arg("C") == 8
