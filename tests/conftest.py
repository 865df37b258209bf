import os

# Under pytest-xdist each worker is one process per core: a torch (OpenMP) pool per worker as well
# would put several threads on each core, and their spin-waits more than double the time of the
# training tests.  One thread per worker (and per subprocess a test starts), unless set already.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Triton reads TRITON_INTERPRET when a kernel is defined: set it before any kernel module loads.
# Without a GPU the kernels then run on CPU tensors through the interpreter.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# "ci" keeps the default run short; HYPOTHESIS_PROFILE=thorough explores more.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``compile_all`` run only when a -m expression names the marker; otherwise
    they are reported as skipped (not deselected), so that every run shows they exist."""
    if "compile_all" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="compiles every kernel configuration: run with -m compile_all")
    for item in items:
        if "compile_all" in item.keywords:
            item.add_marker(skip)
