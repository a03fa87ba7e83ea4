"""Software prefetch of matrix rows for the CSR kernels (``kernels.csr``).

Each non-zero (i, j) of a CSR block makes the kernels read row j of X, or add into row j of
Z: 8 l bytes at a place the hardware prefetcher cannot guess, so without help every
non-zero waits on main memory in turn. Asking for the rows a few non-zeros ahead lets
those waits overlap. numba has no prefetch of its own, so ``prefetch_row`` emits LLVM's
``llvm.prefetch`` for each cache line of the row; it changes no value, only when memory
is read.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

CACHE_LINE = 64


@intrinsic
def prefetch_row(typingctx, matrix, row):
    """Start loading row ``row`` of a C-ordered 2-d array into the cache; returns nothing.
    LLVM's prefetch is a hint: it never faults and changes no value."""
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
        # A read (0), kept in every cache level (locality 3), of data (1), not code.
        flags = [ir.Constant(ir.IntType(32), value) for value in (0, 3, 1)]
        with cgutils.for_range(builder, lines) as loop:
            builder.call(prefetch, [builder.gep(start, [builder.mul(loop.index, line)]), *flags])
        return context.get_dummy_value()

    return types.void(matrix, row), codegen
