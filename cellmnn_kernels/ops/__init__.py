"""The ops: one subpackage per op (kernels, fast torch path, reference)."""
