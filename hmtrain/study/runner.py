"""`hmtrain study`: every arm x seed of a spec (spec.py), trained where `--launch` says (launch.py: in this
process, under torchrun, or as SLURM jobs), evaluated here, resumable.

    <out>/corpus/                 the synthetic corpus (with `synth:`), made once
    <out>/prepared/<key>/         prepared data, once per distinct data/tree setting among the arms
    <out>/runs/<arm>/seed<S>/     memory/ (train.run_dir), eval.json, the eval's figures, done.json (the
                                  arm x seed is finished)
    <out>/dense/<key>/seed<S>/    with eval.dense_baseline: the dense baseline, one per distinct dense config
                                  (memory keys aside) and seed, shared by the arms it serves
    <out>/summary.{md,json}, <out>/*.png, <out>/mlflow.db

Per arm x seed: train (`--resume` when its run directory holds a started run: a killed one continues from
its last checkpoint), the dense baseline likewise, `evaluate`, then done.json. A rerun skips an arm x seed
whose done.json matches its config; one whose config changed is resumed, and train's resume checks say
whether that change is allowed. The study stops at the first failure; rerunning continues from there.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rich.console import Console

from hmtrain.config import Config, ConfigError, flatten, load_config
from hmtrain.data.corpus.synth import synthesize
from hmtrain.data.prepare.pipeline import data_settings, prepare
from hmtrain.eval.evaluate import evaluate, render, write_results
from hmtrain.eval.publish import publish
from hmtrain.study.launch import Launcher, LaunchOptions
from hmtrain.study.report import write_report
from hmtrain.study.spec import Arm, SpecError, StudySpec, check_configs, load_base
from hmtrain.study.tracking import StudyRun, training_run_id
from hmtrain.train.signals import Interrupted
from hmtrain.util.files import write_text

log = logging.getLogger(__name__)

DONE_FILE = "done.json"
EVAL_FILE = "eval.json"


@dataclass
class Job:
    arm: Arm
    seed: int
    directory: Path
    prepared: Path


def _quoted(value: str) -> str:
    """A string as an override's value that YAML reads back as that string (an id of digits stays a string)."""
    return "'" + str(value).replace("'", "''") + "'"


class Study:
    def __init__(self, spec: StudySpec, out: Path, console: Console, launch: Optional[LaunchOptions] = None):
        self.spec, self.out, self.console = spec, Path(out).resolve(), console
        self.launcher = Launcher(launch or LaunchOptions())
        self.corpus = self.out / "corpus"
        base = load_base(spec)
        self.mlflow = base.logging.mlflow
        self.tracking_uri = (base.logging.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                             or f"sqlite:///{self.out / 'mlflow.db'}")
        self.experiment = base.logging.experiment
        self.parent_id: Optional[str] = None
        self.trained = 0  # arms x seeds this invocation ran (not skipped)

    def shared_keys(self) -> list[str]:
        """The study's keys every arm x seed gets (after the spec's overrides)."""
        keys = [f"logging.tracking_uri={_quoted(self.tracking_uri)}"]
        if self.spec.synth is not None:
            keys += [f"data.documents={self.corpus / 'documents.jsonl.gz'}",
                     f"data.probes={self.corpus / 'probes.jsonl'}"]
        if not self.spec.probes:
            keys.append("data.probes=null")
        return keys

    def config(self, job: Job, parent: Optional[str], dense: bool = False) -> Config:
        """The arm x seed's config for its memory run, or (`dense`) its dense baseline. A dense baseline's run
        directory is named by its config: arms that differ only in memory keys share one per seed."""
        name = f"{job.arm.name} seed{job.seed}"
        keys = [*self.shared_keys(), f"data.prepared={job.prepared}", f"train.seed={job.seed}",
                f"train.run_dir={job.directory / 'memory'}", f"logging.run_name={_quoted(name)}"]
        if parent:
            keys.append(f"logging.parent_run_id={_quoted(parent)}")
        cfg = load_config(self.spec.base_config, [*self.spec.overrides(job.arm), *keys,
                                                   *(["train.mode=dense"] if dense else [])])
        if dense:
            cfg.train.run_dir = str(self.out / "dense" / _dense_key(cfg)[:10] / f"seed{job.seed}")
            cfg.logging.run_name = f"dense seed{job.seed} (first for {name})"
        return cfg

    # -- data ------------------------------------------------------------------------------

    def prepare_data(self, configs: dict[str, Config]) -> dict[str, Path]:
        """Arm name -> its prepared directory: one per distinct data/tree setting, prepared once (a finished one
        is reused, an interrupted one resumes from its work directory)."""
        if self.spec.synth is not None:
            self.make_corpus()
        groups: dict[str, list[str]] = {}
        for arm, cfg in configs.items():
            settings = json.dumps(data_settings(cfg), sort_keys=True, default=str)
            groups.setdefault(hashlib.sha256(settings.encode()).hexdigest()[:10], []).append(arm)
        where = {}
        for key, arms in groups.items():
            prepared = self.out / "prepared" / key
            if (prepared / "manifest.json").is_file():
                self.console.print(f"prepared data for {', '.join(arms)}: {prepared} (reused)")
            else:
                self.console.rule(f"prepare the data for arms {', '.join(arms)}")
                cfg = configs[arms[0]]
                cfg.data.prepared = str(prepared)
                prepare(cfg)
            where.update({arm: prepared for arm in arms})
        return where

    def make_corpus(self) -> None:
        """The synthetic corpus, once: synth.json is written last, so without it a corpus is unfinished."""
        args = _synth_args(self.spec.synth)
        made = self.corpus / "synth.json"
        if made.is_file():
            params = json.loads(made.read_text())["params"]
            changed = {key: (params.get(key), value) for key, value in args.items() if params.get(key) != value}
            if changed:
                raise SpecError(f"spec key 'synth': {self.corpus} was made with other settings "
                                f"({', '.join(f'{k}: {a} there, {b} here' for k, (a, b) in changed.items())}); "
                                "choose another --out")
            self.console.print(f"corpus: {self.corpus} (reused)")
            return
        self.console.rule("synthesize the corpus")
        self.console.print(synthesize(self.corpus, **args, overwrite=True))

    # -- runs ------------------------------------------------------------------------------

    def run(self) -> dict:
        started = time.perf_counter()
        configs = check_configs(self.spec, self.shared_keys())  # every arm's, before any work
        self.out.mkdir(parents=True, exist_ok=True)
        prepared = self.prepare_data(configs)
        jobs = [Job(arm, seed, self.out / "runs" / arm.name / f"seed{seed}", prepared[arm.name])
                for arm in self.spec.arms for seed in self.spec.seeds]
        study_run = StudyRun.open(self.out, self.spec, self.tracking_uri, self.experiment, enabled=self.mlflow)
        self.parent_id = study_run.run_id
        status = "FAILED"
        try:
            if self.launcher.concurrent:  # every unfinished run submitted first, then waited for in order
                for job in jobs:
                    if not self.is_done(job):
                        self.start_job(job)
            per_arm: dict[str, dict[int, dict]] = {arm.name: {} for arm in self.spec.arms}
            for k, job in enumerate(jobs, start=1):
                self.console.rule(f"study {self.spec.name}: arm {job.arm.name}, seed {job.seed} ({k} of {len(jobs)})")
                per_arm[job.arm.name][job.seed] = self.run_job(job)
            report = write_report(self.spec, per_arm, self.out, jobs_dir=self.out / "runs")
            study_run.log_report(report, changed=self.trained > 0)
            status = "FINISHED"
        except (KeyboardInterrupt, Interrupted):  # stopped, not failed: a rerun continues
            status = "KILLED"
            self.console.print(f"study {self.spec.name} stopped; rerun the same `hmtrain study` command to continue "
                               "(finished arms x seeds are skipped, this one resumes from its checkpoint)")
            raise
        finally:
            study_run.finish(status)
        self.console.print(f"summary: {report.markdown} and {report.json}")
        self.console.print("figures: " + ", ".join(map(str, report.figures)), soft_wrap=True)
        self.console.print(f"study finished in {time.perf_counter() - started:.0f} s")
        return report.summary

    def is_done(self, job: Job) -> bool:
        memory_cfg = self.config(job, self.parent_id)
        done, results_path = job.directory / DONE_FILE, job.directory / EVAL_FILE
        key = _config_key(memory_cfg, self.spec.dense_baseline)
        return done.is_file() and results_path.is_file() and json.loads(done.read_text()).get("config") == key

    def start_job(self, job: Job) -> None:
        memory_cfg = self.config(job, self.parent_id)
        self.launcher.start(memory_cfg)
        if self.spec.dense_baseline and _dense_checkpoint(dense := self.dense_config(job, memory_cfg)) is None:
            self.launcher.start(dense)

    def dense_config(self, job: Job, memory_cfg: Config) -> Config:
        """A child of the (first) arm x seed's memory run, beside its evaluation."""
        return self.config(job, training_run_id(memory_cfg) or self.parent_id, dense=True)

    def run_job(self, job: Job) -> dict:
        memory_cfg = self.config(job, self.parent_id)
        done, results_path = job.directory / DONE_FILE, job.directory / EVAL_FILE
        if self.is_done(job):
            self.console.print(f"skipped: {job.arm.name} seed {job.seed} finished before ({done})")
            return json.loads(results_path.read_text())
        key = _config_key(memory_cfg, self.spec.dense_baseline)
        self.trained += 1
        checkpoint = self.train(memory_cfg)
        baseline = None
        if self.spec.dense_baseline:
            dense = self.dense_config(job, memory_cfg)
            baseline = _dense_checkpoint(dense)
            if baseline is None:  # not trained yet by an arm before this one
                baseline = self.train(dense)
                write_text(Path(dense.train.run_dir) / DONE_FILE,
                           json.dumps({"config": _dense_key(dense), "checkpoint": str(baseline)}, indent=2) + "\n")
        results = evaluate(memory_cfg, checkpoint, baseline=baseline)
        render(results, self.console)
        write_results(results, results_path)
        publish(memory_cfg, results, job.directory)  # its figures, and its MLflow child of the memory run
        write_text(done, json.dumps({"config": key, "checkpoint": str(checkpoint),
                                     "baseline": str(baseline) if baseline else None}, indent=2) + "\n")
        return results


    def train(self, cfg: Config) -> Path:
        """Train, or resume a run that started before (killed, or finished and now only re-evaluated)."""
        started = (Path(cfg.train.run_dir) / "config.yaml").is_file()
        try:
            return self.launcher.wait(cfg)
        except ConfigError as exc:  # a changed arm that its checkpoint cannot continue
            if not started:
                raise
            raise ConfigError(f"{cfg.logging.run_name}: {exc}; in a study: undo the change to the spec or the "
                              "command line, or give the study another --out") from None


def _dense_checkpoint(cfg: Config) -> Optional[Path]:
    """The checkpoint of a dense baseline another arm already finished with this config (its DONE_FILE)."""
    done = Path(cfg.train.run_dir) / DONE_FILE
    if done.is_file():
        record = json.loads(done.read_text())
        if record.get("config") == _dense_key(cfg) and Path(record["checkpoint"]).is_dir():
            return Path(record["checkpoint"])
    return None


def _dense_key(cfg: Config) -> str:
    """A dense baseline's config, less what it does not read: memory keys, where it runs, MLflow bookkeeping."""
    kept = {key: value for key, value in flatten(cfg).items()
            if not key.startswith(("logging.", "memory.")) and key != "train.run_dir"}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def _config_key(cfg: Config, dense_baseline: bool) -> str:
    """What a finished arm x seed was run with: its config but the MLflow bookkeeping, and the evaluations."""
    kept = {key: value for key, value in flatten(cfg).items() if not key.startswith("logging.")}
    text = json.dumps({"config": kept, "dense_baseline": dense_baseline}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _synth_args(synth: dict) -> dict:
    names = {"people": "num_people", "documents": "num_documents", "zipf": "zipf_exponent", "choices": "num_choices",
             "seed": "seed"}
    return {names[key]: value for key, value in synth.items()}


def run_study(spec: StudySpec, out: Path, console: Optional[Console] = None,
              launch: Optional[LaunchOptions] = None) -> dict:
    return Study(spec, out, console or Console(), launch).run()
