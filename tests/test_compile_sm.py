"""The Triton kernels compile for sm_80 and sm_90 (ahead of time, no GPU needed).  The interpreter
that runs the other tests on CPU accepts code the GPU compiler rejects; this catches it.
Registers and spills are printed.

By default one representative configuration per kernel family and kernel (the families'
``representative``: the register step kernels at D = 5, the paper's dimension, for sm_90 (the cost
model's, shared with test_sass_cost through Triton's cache) and at D = 2 for sm_80; the lane-group
ones at D = 6; the tiled ones in float32 at D = 32 and in float64 at D = 5; both laplace_mmd row kernels
with the gradient term), forward and backward.  Other configurations are the same code unrolled or
tiled differently; ``test_every_configuration_compiles`` (marker ``compile_all``, skipped unless
selected: ``pytest -m compile_all``) compiles every one the launchers can choose."""
import os
import subprocess
import sys

import pytest

from cellmnn_kernels.ops.utils import HAS_TRITON


def compile_check(capsys, *args, timeout):
    """Run ``python -m cellmnn_kernels.compile_check *args`` in a fresh interpreter without
    TRITON_INTERPRET (so that kernels are real JIT functions); fail on any failed compile.  Under
    pytest-xdist (a worker per core already) it compiles in one process."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    jobs = ["--jobs", "1"] if "PYTEST_XDIST_WORKER" in os.environ else []
    res = subprocess.run([sys.executable, "-m", "cellmnn_kernels.compile_check", *jobs, *args],
                         capture_output=True, text=True, env=env, timeout=timeout)
    with capsys.disabled():
        print("\n" + res.stdout.strip())
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "FAILED" not in res.stdout


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("arch", ["80", "90"])
def test_representative_kernels_compile(capsys, arch):
    compile_check(capsys, "--arch", arch, "--representative", timeout=1800)


@pytest.mark.compile_all
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_every_configuration_compiles(capsys):
    compile_check(capsys, "--arch", "80", "90", timeout=4 * 3600)
