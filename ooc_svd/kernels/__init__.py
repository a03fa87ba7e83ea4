"""Block kernels. ``cpu`` holds numba + BLAS kernels; a CUDA module will mirror its names."""
