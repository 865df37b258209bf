"""Every Triton kernel compiles for sm_80 and sm_90 (ahead of time, no GPU needed): the tiled
kernels in every configuration the launchers can choose, and the register kernels (unrolled over D
at compile time, up to a minute per compile) for D = 5, the paper's dimension, and the lane-group
forward for D = 8; other D are the same
code unrolled a different number of times, and ``python -m cellmnn_kernels.compile_check``
compiles every one.  The interpreter that runs the other tests on CPU accepts code the GPU
compiler rejects; this catches it.  Registers and spills are printed."""
import os
import subprocess
import sys

import pytest

from cellmnn_kernels.ops.utils import HAS_TRITON


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_every_kernel_compiles_for_sm80_and_sm90(capsys):
    # A fresh interpreter without TRITON_INTERPRET, so that kernels are real JIT functions.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "cellmnn_kernels.compile_check", "--arch", "80", "90",
                          "--reg-d", "5", "8"],
                         capture_output=True, text=True, env=env, timeout=1800)
    with capsys.disabled():
        print("\n" + res.stdout.strip())
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "FAILED" not in res.stdout
