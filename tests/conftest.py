"""Without a GPU, Triton kernels run in Triton's interpreter. TRITON_INTERPRET is read when a kernel
is decorated, i.e. when a kernel module is first imported, so it is set here, before any test
module is collected."""

import importlib.util
import os

import pytest
import torch

INTERPRET = not torch.cuda.is_available()
if INTERPRET:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def fix_interpreter() -> None:
    """Patch three limits of Triton 3.6's interpreter so that it computes what the GPU does:
    `range()` over a program-id value fails with numpy >= 2.4 (triton-lang/triton#9171, fixed
    upstream); bfloat16 dots multiply the uint16 bit patterns (triton-lang/triton#11584); and
    fp32 -> bf16 casts truncate where the GPU rounds to nearest even. (Its fp32 -> e4m3 casts round
    wrongly too, but the FP8 kernels cast only values already on e4m3's grid.)"""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor
    create_dot = interpreter.InterpreterBuilder.create_dot
    cast_impl = interpreter.InterpreterBuilder.cast_impl

    def patched_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    def f32(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def patched_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, f32(a), f32(b), d, input_precision, max_num_imprecise_acc)

    def patched_cast(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    interpreter._patch_lang_tensor = patched_tensor
    interpreter.InterpreterBuilder.create_dot = patched_dot
    interpreter.InterpreterBuilder.cast_impl = patched_cast



if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
    fix_interpreter()


@pytest.fixture
def row_by_row_dot(monkeypatch):
    """The interpreter's `tl.dot` is numpy's matmul, whose BLAS rounds a row differently by its place
    in the tile; an MMA on the GPU computes each element alike wherever its row sits. A product one row
    at a time models that, so that the bit-identity checks test the kernels' logic."""
    if not INTERPRET:
        return
    import numpy as np
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    create_dot = InterpreterBuilder.create_dot

    def by_rows(self, a, b, d, input_precision, max_num_imprecise_acc):
        rows = [create_dot(self, TensorHandle(a.data[i:i + 1], a.dtype), b, TensorHandle(d.data[i:i + 1], d.dtype),
                           input_precision, max_num_imprecise_acc) for i in range(a.data.shape[0])]
        return TensorHandle(np.concatenate([r.data for r in rows]), rows[0].dtype)

    monkeypatch.setattr(InterpreterBuilder, "create_dot", by_rows)
