"""Compile the memory_ffn Triton kernels for a GPU target on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) runs kernels as Python and skips the compiler's type checks
(e.g. a variable whose type differs between the branches of an ``if``), so CPU-only testing alone
can pass kernels that do not compile. This compiles every kernel for e.g. sm_90 (H100) and reports
what the compiler made of it::

    python -m hmtrain_kernels.compile_check                 # first autotune config of each kernel, bf16
    python -m hmtrain_kernels.compile_check --all-configs --dtype fp32 --arch 90

Must run without TRITON_INTERPRET=1 (the kernels are then plain JIT functions).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# int arguments the launcher's shapes make multiples of 16 at the paper's sizes; Triton specialises
# on that at run time and needs it to vectorise loads (and so to pipeline them with cp.async)
_DIVISIBLE = {"T", "d", "h", "M", "n_rows", "rows_per_split", "split_stride"}
_FP32_OUTPUTS = {"down_wgrad": ("dwd_ptr",), "gate_up_wgrad": ("dwg_ptr", "dwu_ptr")}


def compile_kernel(name: str, tuner, config: triton.Config, dtype: str, arch: int):
    """Compile one autotune config of one kernel; returns triton's CompiledKernel."""
    fn = tuner.fn
    signature, constexprs, attrs = {}, {}, {}
    fixed = {"PRECISION": "ieee" if dtype == "fp32" else "tf32", "SAVE_GU": True}
    for i, arg in enumerate(fn.arg_names):
        if arg.endswith("_ptr"):
            signature[arg] = "*fp32" if arg in _FP32_OUTPUTS.get(name, ()) else f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg in config.kwargs or arg in fixed:
            signature[arg] = "constexpr"
            constexprs[arg] = config.kwargs.get(arg, fixed.get(arg))
        else:
            signature[arg] = "i32"
            if arg in _DIVISIBLE:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default 90 = H100)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--all-configs", action="store_true", help="every autotune config, not just the first")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        p.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    from hmtrain_kernels import memory_ffn_triton as impl

    tuners = {"gate_up_fwd": impl._gate_up_fwd, "down_fwd": impl._down_fwd, "act_bwd": impl._act_bwd,
              "x_bwd": impl._x_bwd, "down_wgrad": impl._down_wgrad, "gate_up_wgrad": impl._gate_up_wgrad}
    for name, tuner in tuners.items():
        for config in tuner.configs if args.all_configs else tuner.configs[:1]:
            start = time.perf_counter()
            kernel = compile_kernel(name, tuner, config, args.dtype, args.arch)
            ptx = kernel.asm["ptx"]
            mma = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "no tensor-core mma"
            blocks = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
            pipelined = "yes" if "cp.async" in ptx else "no"
            print(f"{name:<14} {blocks} warps={config.num_warps} stages={config.num_stages}: {mma}, "
                  f"cp.async {pipelined}, shared {kernel.metadata.shared} B, "
                  f"{time.perf_counter() - start:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
