import numpy as np, scipy.sparse as sp, sys
from ooc_svd import svd
rng = np.random.default_rng(0)
m, n = int(sys.argv[1]), 50
dtype = np.dtype(sys.argv[2])
A = (3e4 + rng.standard_normal((m, n))).astype(dtype)
exact = np.linalg.norm(A.astype(np.float64) - A.astype(np.float64).mean(0))
for method in ("randomized", "gram", "exact"):
    r = svd(sp.csr_matrix(A), 5, center=True, method=method, progress=False)
    fro = r.frobenius_norm if hasattr(r, "frobenius_norm") else None
    print(method, "note:", r.note)
    s = np.linalg.svd(A.astype(np.float64) - A.astype(np.float64).mean(0), compute_uv=False)[:5]
    print("  S rel err", np.max(np.abs(r.S - s) / s), "fro", fro, exact, None if fro is None else abs(fro**2 - exact**2) / exact**2)
