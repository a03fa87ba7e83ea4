import numpy as np, numba, math
@numba.njit
def seq(x):
    t = 0.0
    for v in x:
        t += v * v
    return t
rng = np.random.default_rng(0)
for dt in (np.float32, np.float64):
    for m in (10**4, 10**5, 10**6, 10**7):
        x = (3e4 + rng.standard_normal(m)).astype(dt).astype(np.float64)
        exact = math.fsum(x * x)  # x*x exact for float32 data
        exact = float(sum(__import__('fractions').Fraction(v)**2 for v in x[:0])) if False else exact
        s = seq(x)
        var = np.sum((x - x.mean())**2)
        print(dt.__name__, m, "sum err/total", (s - exact) / exact, "err/var", (s-exact)/var, "eps*sqrt(m)*ratio", 2.2e-16*math.sqrt(m)*exact/var)
