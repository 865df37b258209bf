"""Benchmarks (pytest-benchmark).  Run: python -m pytest bench -q -n 0 (one process: pytest-benchmark
does not time tests spread over pytest-xdist workers, which the project's pytest.ini asks for)

Each op file records its medians in RESULTS; the pytest run ends with a table of speed-ups of every
backend over "reference" at the same size, measured in the same run."""
import os
import platform

import torch

# On a machine without a GPU the Triton kernels could only run interpreted (not a speed
# measurement), so the benchmarks use triton on CUDA tensors only.
RESULTS = {}  # (op, size, mode) -> {backend: median seconds}


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section(f"speed-up over reference (median times) on {machine()}")
    for (op, size, mode), times in sorted(RESULTS.items()):
        ref = times.get("reference")
        parts = []
        for backend, t in sorted(times.items()):
            ratio = f" ({ref / t:.1f}x)" if ref and backend != "reference" else ""
            parts.append(f"{backend} {t * 1e3:.3g} ms{ratio}")
        tr.write_line(f"{op:<18} {size:<16} {mode:<8} " + ", ".join(parts))
