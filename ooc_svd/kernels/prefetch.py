"""Software prefetch of matrix rows for the CSR kernels (``kernels.csr``).

Each non-zero (i, j) of a CSR block makes the kernels read row j of X, or add into row j of
Z: 8 l bytes at a place the hardware prefetcher cannot guess, so without help every
non-zero waits on main memory in turn. Asking for the rows a few non-zeros ahead lets
those waits overlap. numba has no prefetch of its own, so ``prefetch_row`` emits LLVM's
``llvm.prefetch``, a hint that never faults and changes no value, only when memory is read.

It prefetches as many cache lines as the row's bytes fill, from the row's first byte:
the whole row when it starts on a line, all but its last line when it does not (at l = 30,
half the rows). Covering that last line too, with a count computed from the row's address,
measured no faster on two cores (benchmarks/bench_csr_kernels.py, n = 2e5, power kernel
against ahead = 0: 1.13-1.18x with uniform columns, where this version ran at 1.11-1.53x in
the runs around it) and slower with the rows in cache (0.50-0.54x against 0.73-0.88x).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

CACHE_LINE = 64


@intrinsic
def prefetch_row(typingctx, matrix, row):
    """Start loading row ``row`` of a C-ordered 2-d array into the cache (see above for
    which lines); returns nothing."""
    if not (isinstance(matrix, types.Array) and matrix.ndim == 2 and matrix.layout == "C"
            and isinstance(row, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        matrix_type, row_type = signature.args
        array = context.make_array(matrix_type)(context, builder, args[0])
        index = context.cast(builder, args[1], row_type, types.intp)
        start = builder.gep(builder.bitcast(array.data, ir.IntType(8).as_pointer()),
                            [builder.mul(index, builder.extract_value(array.strides, 0))])
        row_bytes = builder.mul(builder.extract_value(array.shape, 1),
                                context.get_constant(types.intp, matrix_type.dtype.bitwidth // 8))
        line = context.get_constant(types.intp, CACHE_LINE)
        lines = builder.udiv(builder.add(row_bytes, context.get_constant(types.intp,
                                                                         CACHE_LINE - 1)), line)
        prefetch = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()] + [ir.IntType(32)] * 3),
            "llvm.prefetch.p0i8")
        # A read (0), kept in every cache level (locality 3), of data (1), not code. Z's rows
        # are added into, but the write hint (1) measured no faster.
        flags = [ir.Constant(ir.IntType(32), value) for value in (0, 3, 1)]
        with cgutils.for_range(builder, lines) as loop:
            builder.call(prefetch, [builder.gep(start, [builder.mul(loop.index, line)]), *flags])
        return context.get_dummy_value()

    return types.void(matrix, row), codegen
