"""The `hmtrain` command line.

    hmtrain data synth   --out DIR [...]
    hmtrain data import  dictd --out DIR [NAME ...] [--dir /usr/share/dictd]
    hmtrain data prepare --config CFG [key=value ...] [--overwrite]     (also under torchrun)
    hmtrain train        --config CFG [key=value ...] [--resume [--fallback]]
    hmtrain eval         --config CFG --checkpoint DIR [--baseline DIR] [--out FILE] [key=value ...]
    hmtrain eval retention --config CFG --encoder SPEC [--encoder SPEC ...] [--out DIR]
                         [--deep-router SPEC [--shallow-levels N]] [key=value ...]   (also `hmtrain retention`)
    hmtrain info         --config CFG [--world-size W] [--tensor-parallel N] [--checkpoint-gbps GB/S] [key=value ...]
    hmtrain config show  --config CFG [key=value ...]    (the merged config, as YAML)
    hmtrain config keys  [PREFIX]                          (every key: type, default, choices, help)
    hmtrain export       --checkpoint DIR --out DIR [--overwrite] [--config CFG] [key=value ...]
    hmtrain generate     (--checkpoint DIR | --export DIR) --prompt TEXT [--max-new-tokens N --temperature T
                         --top-k K --seed S --memory fetched|generic|none] [--config CFG] [key=value ...]
    hmtrain demo         [--out DIR] [--seeds S ...] [--people N --documents N] [key=value ...]
    hmtrain study        --spec SPEC [--out DIR] [--launch local|torchrun|slurm --nproc N --nodes N] [key=value ...]
                                                                   (arms x seeds; SPEC: a file or configs/studies/NAME)
    hmtrain bench        NAME [its options]    (hmtrain bench --help lists them; hmtrain bench NAME --help)

CFG is a YAML file or a preset name from configs/ (tiny, paper-160m, ...).
Overrides may come before or after the options.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import shutil
import sys
import traceback
from pathlib import Path

from hmtrain.bench import NAMES as BENCHMARKS
from hmtrain.config import load_config
from hmtrain.exits import every_rank_reports, exit_code, one_line

log = logging.getLogger("hmtrain")


def _config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required, help="YAML file or preset name (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.global_batch_size=16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hmtrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_data_commands, _training_commands, _serving_commands, _tool_commands):
        add(commands)
    return parser


def _data_commands(commands) -> None:
    data = commands.add_parser("data", help="make and prepare data").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="generate the long-tail facts corpus and its probe questions")
    synth.add_argument("--out", required=True, type=Path)
    synth.add_argument("--people", type=int, default=400)
    synth.add_argument("--documents", type=int, default=3000)
    synth.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of how often a person appears")
    synth.add_argument("--choices", type=int, default=8, help="answer choices per probe")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--overwrite", action="store_true", help="replace a corpus already in --out")
    importer = data.add_parser("import", help="turn other sources into documents (parquet)")
    sources = importer.add_subparsers(dest="source", required=True)
    dictd = sources.add_parser("dictd", help="Debian's dictd dictionaries (apt-get install dict-gcide dict-wn ...): "
                                             "one document per headword")
    dictd.add_argument("--out", required=True, type=Path, help="directory for NAME.parquet files")
    dictd.add_argument("--dir", type=Path, default=Path("/usr/share/dictd"), help="where NAME.index and "
                       "NAME.dict.dz are (default: %(default)s)")
    dictd.add_argument("names", nargs="*", metavar="NAME", help="dictionaries, e.g. wn gcide (default: all in --dir)")
    dictd.add_argument("--overwrite", action="store_true", help="replace NAME.parquet files already in --out")
    prepare = data.add_parser("prepare", help="documents -> embeddings -> tree -> paths -> tokens -> shards "
                                              "(under torchrun: input files split across ranks)")
    _config_args(prepare)
    prepare.add_argument("--overwrite", action="store_true", help="replace an existing prepared directory")


def _training_commands(commands) -> None:
    train = commands.add_parser("train", help="pretrain the anchor, then the memory phase (or a dense baseline)")
    _config_args(train)
    train.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    train.add_argument("--fallback", action="store_true",
                       help="with --resume: if the latest checkpoint is broken, resume from the newest loadable one "
                            "(the log says which were skipped and why)")

    evaluate = commands.add_parser("eval", help="perplexity and long-tail probes: memory vs generic vs none")
    _config_args(evaluate)
    evaluate.add_argument("--checkpoint", required=True, help="checkpoint directory (or a run directory)")
    evaluate.add_argument("--baseline", help="dense baseline checkpoint (or run directory) to compare with")
    evaluate.add_argument("--out", type=Path, help="write results as JSON here, and its figures beside it "
                          "(FILE's stem + _long_tail.png, _subtree_perplexity.png, _tree_balance.png)")

    retention = commands.add_parser(
        "retention", help="information retention of frozen encoders (Badger 2026); also `hmtrain eval retention`")
    _config_args(retention)
    retention.add_argument("--encoder", action="append", default=[], metavar="[LABEL=]SPEC",
                           help="router[:minilm|hashing], anchor:CKPT, memory:CKPT, untrained:anchor or "
                                "untrained:memory; repeat to compare encoders")
    retention.add_argument("--out", type=Path, default=Path("runs/retention"),
                           help="results.json, results.md, metrics.jsonl and the MLflow store go here")
    retention.add_argument("--deep-router", metavar="SPEC",
                           help="beyond the paper: route the deep tree levels by this encoder and compare with "
                                "MiniLM routing (needs data.documents; data.probes adds probe routing)")
    retention.add_argument("--shallow-levels", type=int, default=1, help="tree levels that stay MiniLM-routed")

    info = commands.add_parser("info", help="parameter counts per level, and memory and traffic per rank")
    _config_args(info)
    info.add_argument("--world-size", type=int, default=1, help="ranks to size the per-rank table for")
    info.add_argument("--tensor-parallel", type=int, default=None, metavar="N",
                      help="size the 2-D layout (N tensor-parallel x W/N data-parallel ranks): the same as "
                           "parallel.tensor_parallel=N")
    info.add_argument("--checkpoint-gbps", type=float, default=None, metavar="GB/S",
                      help="write bandwidth to the checkpoint directory, all ranks together, in gigabytes "
                           "(10^9 bytes) per second, for the checkpoint's write time (default 1)")


def _tool_commands(commands) -> None:
    config = commands.add_parser("config", help="the merged config, and every key with its help").add_subparsers(
        dest="config_command", required=True)
    show = config.add_parser("show", help="print the config a command would run with (YAML)")
    _config_args(show)
    keys = config.add_parser("keys", help="every config key: type, default, allowed values, help")
    keys.add_argument("prefix", nargs="?", default="", help="only keys starting with this, e.g. train or memory.")
    benchmarks = f"benchmarks that print a table: {', '.join(BENCHMARKS)} (hmtrain/bench/NAME.py)"
    bench = commands.add_parser("bench", help=benchmarks, description=benchmarks)
    bench.add_argument("benchmark", choices=BENCHMARKS, metavar="NAME", help="one of: " + ", ".join(BENCHMARKS))
    bench.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own (hmtrain bench NAME --help)")
    demo = commands.add_parser("demo", help="the whole pipeline on CPU with the tiny config")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--config", default="tiny")
    demo.add_argument("--overwrite", action="store_true", help="delete --out first")
    demo.add_argument("--seeds", type=int, nargs="+", default=[0],
                      help="train and evaluate once per seed; with several, the table gives mean and spread")
    demo.add_argument("--people", type=int, default=400, help="people in the synthetic corpus")
    demo.add_argument("--documents", type=int, default=3000, help="documents in the synthetic corpus")
    demo.add_argument("overrides", nargs="*", metavar="key=value")
    study = commands.add_parser("study", help="run every arm x seed of a study spec, evaluate, summarise "
                                              "(resumable: rerun to continue)")
    study.add_argument("--spec", required=True, help="a study spec (YAML) or its name in configs/studies/")
    study.add_argument("--out", type=Path, help="the study's directory (default: runs/studies/<spec name>)")
    study.add_argument("--launch", default="local", choices=["local", "torchrun", "slurm"],
                       help="where each run trains: in this process, one by one (local); one by one on --nproc "
                            "ranks of this machine (torchrun); or all submitted at once as SLURM jobs of --nodes "
                            "nodes x --nproc ranks (slurm). Evaluation runs here in every case")
    study.add_argument("--nproc", type=int, default=1, help="ranks per run (torchrun) or per node (slurm)")
    study.add_argument("--nodes", type=int, default=1, help="nodes per SLURM job (--launch slurm)")
    study.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config overrides for every arm (after base.overrides, before the arm's own)")


def _serving_commands(commands) -> None:
    export = commands.add_parser("export", help="a checkpoint as memory-mapped bank tables + anchor, tree, tokenizer")
    export.add_argument("--checkpoint", required=True, help="checkpoint directory (or a run directory)")
    export.add_argument("--out", required=True, type=Path, help="directory to create")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _config_args(export, required=False)  # only data.prepared is read: where the tree and tokenizer are

    generate = commands.add_parser("generate", help="route a prompt, fetch its memory, continue it")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint directory (or a run directory)")
    source.add_argument("--export", type=Path, help="directory written by `hmtrain export`")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    generate.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0: all)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--memory", choices=("fetched", "generic", "none"), default="fetched",
                          help="the routed path's memory, the generic memory, or the anchor alone")
    _config_args(generate, required=False)  # with --checkpoint: only data.prepared is read


def cmd_synth(args) -> None:
    from hmtrain.data.corpus.synth import synthesize

    summary = synthesize(args.out, num_people=args.people, num_documents=args.documents, zipf_exponent=args.zipf,
                         num_choices=args.choices, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {args.out}: {summary}")


def cmd_import(args) -> None:
    from hmtrain.data.corpus.import_dictd import import_dictd

    counts = import_dictd(args.out, args.names, args.dir, overwrite=args.overwrite)
    for name, count in counts.items():
        print(f"wrote {args.out / (name + '.parquet')}: {count} documents")


def cmd_prepare(args) -> None:
    from hmtrain.data.prepare.pipeline import prepare

    cfg = load_config(args.config, args.overrides)
    out = prepare(cfg, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0":
        print(f"prepared data in {out}")


def cmd_train(args) -> None:
    from hmtrain.train.trainer import train

    if args.fallback and not args.resume:
        raise ValueError("--fallback only applies with --resume")
    cfg = load_config(args.config, args.overrides)
    final = train(cfg, resume=args.resume, fallback=args.fallback)
    print(f"checkpoint: {final}")


def cmd_eval(args) -> None:
    from hmtrain.eval.evaluate import check_output_path, evaluate, render, write_results
    from hmtrain.eval.memory_eval import checkpoint_family, evaluate_memory_models, render_memory
    from hmtrain.eval.publish import publish

    cfg = load_config(args.config, args.overrides)
    if args.out:
        check_output_path(args.out)  # before the evaluation, not after it
    if checkpoint_family(args.checkpoint) == "memory_model":
        results = evaluate_memory_models(cfg, [args.checkpoint, *([args.baseline] if args.baseline else [])])
        render_memory(results)
        if args.out:
            write_results(results, args.out)
        return
    results = evaluate(cfg, args.checkpoint, baseline=args.baseline)
    render(results)
    if args.out:
        write_results(results, args.out)  # before figures and MLflow: neither can cost the results
    published = publish(cfg, results, args.out.parent if args.out else None,
                        prefix=f"{args.out.stem}_" if args.out else "")
    if published.figures:
        print("figures: " + ", ".join(map(str, published.figures)))
    if published.mlflow_run_id:
        print(f"MLflow: eval logged as run {published.mlflow_run_id}, a child of the checkpoint's training run")


def cmd_retention(args) -> None:
    from hmtrain.retention.probe import run_retention

    if args.deep_router is None and args.shallow_levels != 1:
        raise ValueError("--shallow-levels only applies with --deep-router")
    run_retention(load_config(args.config, args.overrides), args.encoder, args.out, deep_router=args.deep_router,
                  shallow_levels=args.shallow_levels)


def cmd_config(args) -> None:
    from hmtrain.config import to_yaml

    if args.config_command == "show":
        print(to_yaml(load_config(args.config, args.overrides)), end="")
        return
    from hmtrain.config.keys import print_keys

    if not print_keys(args.prefix):
        raise ValueError(f"no config key starts with {args.prefix!r} (sections: model, memory, tree, data, train, "
                         "parallel, eval, logging, memory_model, retention)")


def cmd_info(args) -> None:
    from hmtrain.info import CHECKPOINT_GBPS, print_info

    if args.world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {args.world_size}")
    gbps = CHECKPOINT_GBPS if args.checkpoint_gbps is None else args.checkpoint_gbps
    if not (math.isfinite(gbps) and gbps > 0):
        raise ValueError(f"--checkpoint-gbps must be a positive number of GB/s, got {args.checkpoint_gbps}")
    overrides = [*args.overrides, *([f"parallel.tensor_parallel={args.tensor_parallel}"]
                                    if args.tensor_parallel is not None else [])]
    print_info(load_config(args.config, overrides), world_size=args.world_size, checkpoint_gbps=gbps)


def cmd_bench(args) -> None:
    importlib.import_module(f"hmtrain.bench.{args.benchmark}").main(args.options)


def cmd_demo(args) -> None:
    from hmtrain.demo import run_demo

    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file, not a directory")
    if args.out.exists() and any(args.out.iterdir()):
        if not args.overwrite:
            raise FileExistsError(f"--out {args.out} already holds a demo; pass --overwrite to replace it, or "
                                  "choose another --out")
        shutil.rmtree(args.out)
    run_demo(args.out, args.config, args.overrides, seeds=args.seeds, people=args.people, documents=args.documents)


def cmd_study(args) -> None:
    from hmtrain.study.launch import LaunchOptions
    from hmtrain.study.runner import run_study
    from hmtrain.study.spec import load_spec

    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise ValueError("hmtrain study is one process that hands its runs to the launchers: start it without "
                         "torchrun, and give it --launch torchrun --nproc N (or --launch slurm)")
    launch = LaunchOptions(args.launch, args.nproc, args.nodes)
    spec = load_spec(args.spec, args.overrides)
    out = args.out if args.out is not None else Path("runs") / "studies" / spec.name
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    run_study(spec, out, launch=launch)


def cmd_export(args) -> None:
    from hmtrain.serve.export import export_checkpoint

    manifest = export_checkpoint(args.checkpoint, args.out, config=args.config, overrides=args.overrides,
                                 overwrite=args.overwrite)
    bank = manifest["bank"]
    size = sum(entry["bytes"] for entry in manifest["files"].values())
    tables = ", ".join(bank["tables"]) if bank else "none (trained without memory)"
    print(f"exported step {manifest['source']['step']} to {args.out}: {size:,} bytes; bank tables: {tables}")


def cmd_generate(args) -> None:
    import torch

    from hmtrain.serve.generate import check_sampling, format_result, from_checkpoint, from_export

    check_sampling(args.max_new_tokens, args.temperature, args.top_k)  # before loading anything
    if not args.prompt.strip():
        raise ValueError("--prompt is empty: give some text to route and continue")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.export is not None:
        if args.config or args.overrides:
            raise ValueError("--config and key=value overrides apply to --checkpoint only; an export holds its "
                             "own tree and tokenizer")
        model = from_export(args.export, device)
    else:
        model = from_checkpoint(args.checkpoint, args.config, args.overrides, device)
    result = model.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, seed=args.seed, memory=args.memory)
    print(format_result(result, args.prompt))


COMMANDS = {"synth": cmd_synth, "import": cmd_import, "prepare": cmd_prepare, "train": cmd_train, "eval": cmd_eval,
            "retention": cmd_retention, "info": cmd_info, "demo": cmd_demo, "study": cmd_study, "bench": cmd_bench,
            "export": cmd_export, "generate": cmd_generate, "config": cmd_config}


def _eval_retention_alias(argv: list[str]) -> list[str]:
    """`hmtrain [--debug] eval retention ...` is `hmtrain retention ...` (`eval` takes overrides positionally,
    so a sub-subcommand there would read as an override)."""
    for i, item in enumerate(argv):
        if item.startswith("-"):
            continue
        if item == "eval" and argv[i + 1:i + 2] == ["retention"]:
            return [*argv[:i], "retention", *argv[i + 2:]]
        break
    return argv


LIST_OPTIONS = ("--seeds", "--ranks")  # options taking several integers


def _lists_last(argv: list[str]) -> list[str]:
    """Moves a list option and its integers to the end, so that argparse does not read the overrides that
    follow it (`demo --seeds 0 1 2 train.seed=...`) as more of its values."""
    for i, item in enumerate(argv):
        if item in LIST_OPTIONS:
            end = i + 1
            while end < len(argv) and argv[end].lstrip("-").isdigit():
                end += 1
            return [*argv[:i], *argv[end:], *argv[i:end]]
    return argv


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """argparse, with `key=value` overrides allowed anywhere (e.g. after --resume)."""
    parser = build_parser()
    argv = _lists_last(_eval_retention_alias(list(sys.argv[1:] if argv is None else argv)))
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    from hmtrain.parallel.supervisor import report_to_launcher, stop_with_supervisor

    stop_with_supervisor()  # a torchrun worker checkpoints and stops if torchrun is killed
    args = parse_args(argv)
    command = args.data_command if args.command == "data" else args.command
    rc = 0
    try:
        logging.basicConfig(level=_log_level(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
        COMMANDS[command](args)
    except Exception as exc:  # every failure leaves with one line and the code that says which kind it was
        if args.debug:
            traceback.print_exception(exc)
        rank = os.environ.get("RANK")
        where = f" (rank {rank})" if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
        rc = exit_code(exc)
        text = f"{'' if rc > 128 else 'error: '}{one_line(exc)}"
        # a stopped rank's line says how to resume: each prints its own; errors go through the launcher
        if rc > 128 or not report_to_launcher(f"hmtrain {command}", text):
            # one write with its newline: ranks share the launcher's stderr, and print() writes the
            # newline apart, so two ranks failing at once could run their lines together
            sys.stderr.write(f"hmtrain {command}{where}: {text}\n")
            sys.stderr.flush()
        if every_rank_reports(exc):
            _meet()
    return _leave(rc)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level() -> str:
    """$HMTRAIN_LOG_LEVEL: the level of hmtrain's log lines on stderr (tests and benchmarks set WARNING)."""
    level = os.environ.get("HMTRAIN_LOG_LEVEL", "INFO")
    if level.upper() not in LOG_LEVELS:
        raise ValueError(f"HMTRAIN_LOG_LEVEL={level!r}: not a log level; use {', '.join(LOG_LEVELS)}")
    return level.upper()


def _meet() -> None:
    """Wait for the other ranks to print their lines too (bounded by the process group's timeout)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        sys.stderr.flush()
        dist.barrier()


def _leave(rc: int) -> int:
    """A torchrun worker ends its process group and leaves with os._exit: gloo's threads can abort a
    normal interpreter exit after collectives, which would turn a clean finish into a crash."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return rc
    from hmtrain.parallel.dist import shutdown

    try:
        if rc == 0:
            shutdown()
        else:
            dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
