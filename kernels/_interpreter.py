"""Make Triton's CPU interpreter compute what the GPU computes, where it does not (Triton 3.x):

- fp32 -> bf16 casts: the interpreter truncates (it passes no rounding mode); the GPU rounds to
  nearest even. Without the fix every bf16 store is off by up to one ulp.
- `tl.dot` of bf16 tiles: the interpreter multiplies the raw 16-bit patterns as integers; the GPU
  multiplies the values (exactly, accumulating in fp32).

Applied once, only when TRITON_INTERPRET=1 (the kernels never depend on it on a GPU)."""

import numpy as np
import torch

_applied = False


def apply():
    global _applied
    if _applied:
        return
    import triton.language as tl
    from triton.runtime import interpreter

    original_convert = interpreter._convert_float

    def convert(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
            f32 = torch.from_numpy(np.ascontiguousarray(input).view(np.float32))
            return f32.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return original_convert(input, input_dtype, output_dtype, rounding_mode)

    interpreter._convert_float = convert

    original_dot = interpreter.InterpreterBuilder.create_dot

    def to_f32(handle):
        if handle.dtype.scalar == tl.bfloat16:
            data = original_convert(handle.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, to_f32(a), to_f32(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot
    _applied = True
