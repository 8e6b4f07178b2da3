"""Triton kernels (installed as qpeft.triton_kernels); imported lazily, never at `import qpeft`."""
