"""Block kernels behind one interface (``backend.Kernels``): ``cpu`` (numba + BLAS, dense),
``csr`` (numba, sparse), and ``cuda`` / ``cuda_backend`` (numba-cuda, dense and sparse)."""
