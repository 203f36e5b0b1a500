"""Compile every paged-attention launch for a Hopper GPU (sm_90) on a machine without one.

    python tools/compile_kernels.py        # one line per kernel and shape; exit 1 on a failure

Triton's interpreter (the CPU tests) runs the kernels' arithmetic but not the compiler's
type rules: a name given a scalar in one branch and a vector in another ran there and
failed to compile on the H200 (2026-12-03). This sends each launch ``plan_launches``
makes for a few shapes through triton's whole pipeline for sm_90 (front end, MLIR
passes, ptxas from the triton wheel). Run it without TRITON_INTERPRET: under the
interpreter, ``@triton.jit`` gives functions that cannot be compiled.
"""
from __future__ import annotations

import os
import sys
import traceback

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mii_engines.runtime.kernels.triton_paged import Launch, NewKeys, plan_launches

HOPPER = GPUTarget("cuda", 90, 32)
POINTERS = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16",
            torch.int32: "*i32", torch.int64: "*i64"}
# (dtype, heads, kv heads, head_dim, window, softcap): the 1.5B / Mistral shape in bf16,
# a wide head with a window and softcap in fp16 (Gemma-like), fp32 with a large group
SHAPES = [(torch.bfloat16, 32, 8, 64, 0, 0.0), (torch.float16, 8, 4, 256, 37, 30.0),
          (torch.float32, 16, 1, 128, 0, 0.0)]


def signature(launch: Launch):
    """Triton's signature and constants of ``launch``'s arguments."""
    types, constants = {}, {}
    for index, name in enumerate(launch.kernel.arg_names):
        if name in launch.constants:
            types[name] = "constexpr"
            constants[(index,)] = launch.constants[name]
            continue
        value = launch.args[name]
        if isinstance(value, torch.Tensor):
            types[name] = POINTERS[value.dtype]
        else:
            types[name] = "fp32" if isinstance(value, float) else "i32"
    return types, constants


def launches(dtype, heads, kv_heads, dim, window, softcap):
    """A mixed step's launches (its decode rows' in shares) and a split decode step's (with
    new keys) for one shape."""
    block, seqs = 16, 6
    query = torch.zeros(40, heads, dim, dtype=dtype)
    cache = torch.zeros(30, block, kv_heads, dim, dtype=dtype)
    tables = torch.zeros(seqs, 8, dtype=torch.int32)
    lens = torch.zeros(seqs, dtype=torch.int32)
    starts = torch.zeros(seqs + 1, dtype=torch.int32)
    new = NewKeys(torch.zeros(40, kv_heads, dim, dtype=dtype),
                  torch.zeros(40, kv_heads, dim, dtype=dtype), torch.zeros(40, dtype=torch.long))
    common = (query, cache, cache, tables, lens, starts)
    return (plan_launches(*common, torch.zeros_like(query), dim ** -0.5, window, softcap,
                          decode_only=False, splits=4)
            + plan_launches(*common, torch.zeros_like(query), dim ** -0.5, window, softcap,
                            decode_only=True, splits=4, new=new))


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
        return 2
    failed = 0
    for shape in SHAPES:
        for launch in launches(*shape):
            name = f"{launch.kernel.__name__} {shape[0]} heads {shape[1]}/{shape[2]} dim {shape[3]}"
            try:
                types, constants = signature(launch)
                kernel = triton.compile(ASTSource(launch.kernel, types, constants), target=HOPPER,
                                        options=dict(num_warps=launch.num_warps,
                                                     num_stages=launch.num_stages))
                print(f"ok {name}: {len(kernel.asm['cubin'])} bytes of cubin, "
                      f"{kernel.metadata.shared} bytes of shared memory")
            except Exception:
                failed += 1
                print(f"FAILED {name}\n{traceback.format_exc()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
