"""A study spec: a YAML file (read with omegaconf, as configs are) naming a base config, arms and seeds.

    name: memory-kinds-tiny          # optional; default: the file's stem
    base:
      config: tiny                   # a preset name or a YAML file, as `--config` takes
      overrides: [train.memory_steps=60]
    synth: {people: 400, documents: 3000}   # optional: make the synthetic corpus in <out>/corpus
    arms:
      - {name: ffn, overrides: [memory.kind=ffn]}
      - {name: lora_ffn, overrides: [memory.kind=lora_ffn]}
    seeds: [0, 1]
    eval: {probes: true, dense_baseline: false}   # optional; these are the defaults

An arm's config is base.config <- base.overrides <- the command line's overrides <- the arm's overrides,
then the study's own keys (below), which a spec may not set. Every problem is a SpecError (exit 2) naming
the spec key, found before any work starts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from hmtrain.config import Config, ConfigError, load_config
from hmtrain.config.load import CONFIG_DIR, find_yaml

STUDY_DIR = CONFIG_DIR / "studies"

# set by the runner per arm x seed: where its data and run go, its seed, and its MLflow place
OWNED_KEYS = ("data.prepared", "train.run_dir", "train.seed", "logging.parent_run_id", "logging.run_name")
# one MLflow store and experiment for the whole study: base.overrides may set these, an arm may not
STUDY_WIDE_KEYS = ("logging.tracking_uri", "logging.experiment", "logging.mlflow")
SYNTH_OWNED = ("data.documents", "data.probes")  # with `synth:`, the study's corpus
TOP_KEYS = ("name", "base", "synth", "arms", "seeds", "eval")
SYNTH_KEYS = {"people": int, "documents": int, "zipf": float, "choices": int, "seed": int}
EVAL_KEYS = ("probes", "dense_baseline")
CLI = "the command line's overrides"
ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a directory name and an MLflow run name


class SpecError(ValueError):
    """A study spec that cannot run; the message names the spec key."""


@dataclass
class Arm:
    name: str
    overrides: list[str]


@dataclass
class StudySpec:
    name: str
    path: Path
    base_config: str
    base_overrides: list[str]
    arms: list[Arm]
    seeds: list[int]
    synth: dict[str, Any] | None = None  # synthesize()'s arguments, or None: data.documents is given
    probes: bool = True
    dense_baseline: bool = False
    cli_overrides: list[str] = field(default_factory=list)

    def overrides(self, arm: Arm) -> list[str]:
        """The arm's overrides on top of base.config, before the study's own keys."""
        return [*self.base_overrides, *self.cli_overrides, *arm.overrides]


def resolve_spec(name_or_path: str) -> Path:
    found = find_yaml(name_or_path, STUDY_DIR)
    if found is not None:
        return found
    known = ", ".join(sorted(p.stem for p in STUDY_DIR.glob("*.yaml"))) or "none"
    raise SpecError(f"--spec {name_or_path!r}: no such file, and not a study in {STUDY_DIR} (studies: {known})")


def load_spec(name_or_path: str, cli_overrides: Sequence[str] = ()) -> StudySpec:
    path = resolve_spec(name_or_path)
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as exc:  # yaml errors carry the line number
        raise SpecError(f"spec {path}: not valid YAML: {' '.join(str(exc).split())}") from exc
    if not isinstance(raw, dict):
        raise SpecError(f"spec {path}: expected a mapping with keys {', '.join(TOP_KEYS)}")
    _known(raw, TOP_KEYS, "")
    base = _mapping(raw.get("base"), "base", required=True)
    _known(base, ("config", "overrides"), "base.")
    spec = StudySpec(name=_name(raw.get("name", path.stem), "name"), path=path,
                     base_config=_text(base.get("config"), "base.config"),
                     base_overrides=_overrides(base.get("overrides", []), "base.overrides", allow_empty=True),
                     arms=_arms(raw.get("arms")), seeds=_seeds(raw.get("seeds")),
                     synth=_synth(raw.get("synth")), cli_overrides=_overrides(cli_overrides, CLI, allow_empty=True))
    if spec.synth is not None:
        _check_corpus_keys(spec)
    evaluations = _mapping(raw.get("eval", {}), "eval")
    _known(evaluations, EVAL_KEYS, "eval.")
    spec.probes = _flag(evaluations.get("probes", True), "eval.probes")
    spec.dense_baseline = _flag(evaluations.get("dense_baseline", False), "eval.dense_baseline")
    return spec


def _check_corpus_keys(spec: StudySpec) -> None:
    """With `synth:`, the corpus is the study's: no override may point data.documents or data.probes elsewhere."""
    for key, overrides in (("base.overrides", spec.base_overrides), (CLI, spec.cli_overrides),
                           *((f"arms[{i}].overrides", arm.overrides) for i, arm in enumerate(spec.arms))):
        given = [item.split("=", 1)[0] for item in overrides if item.split("=", 1)[0] in SYNTH_OWNED]
        if given:
            where = key if key == CLI else f"spec key '{key}'"
            raise SpecError(f"{where}: {given[0]} is the study's own corpus when 'synth' is given; "
                            "drop one of the two")


def load_base(spec: StudySpec) -> Config:
    """base.config with base.overrides and the command line's: what holds for the whole study."""
    try:
        load_config(spec.base_config, [])
    except ConfigError as exc:
        raise SpecError(f"spec key 'base.config': {exc}") from None
    try:
        return load_config(spec.base_config, [*spec.base_overrides, *spec.cli_overrides])
    except ConfigError as exc:
        raise SpecError(f"spec key 'base.overrides' (or {CLI}): {exc}") from None


def check_configs(spec: StudySpec, study_keys: Sequence[str]) -> dict[str, Config]:
    """Every arm's config, loaded with the study's own keys (`study_keys`), so a bad override stops the study
    before any work; the message names the spec key it came from."""
    load_base(spec)
    configs = {}
    for i, arm in enumerate(spec.arms):
        try:
            configs[arm.name] = load_config(spec.base_config, [*spec.overrides(arm), *study_keys])
        except ConfigError as exc:
            raise SpecError(f"spec key 'arms[{i}].overrides' (arm {arm.name}): {exc}") from None
        if configs[arm.name].model.family != "lm":
            raise SpecError(f"spec key 'arms[{i}]' (arm {arm.name}): model.family="
                            f"{configs[arm.name].model.family}: hmtrain study runs model.family=lm configs only")
    return configs


def _known(raw: dict, allowed: Sequence[str], prefix: str) -> None:
    for key in raw:
        if key not in allowed:
            raise SpecError(f"spec key '{prefix}{key}': unknown (allowed: {', '.join(allowed)})")


def _mapping(value: Any, key: str, required: bool = False) -> dict:
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"spec key '{key}': expected a mapping, got {value!r}")
    return value


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"spec key '{key}': expected a non-empty string, got {value!r}")
    return value


def _name(value: Any, key: str) -> str:
    if not isinstance(value, str) or not ARM_NAME.match(value):
        raise SpecError(f"spec key '{key}': {value!r} must be letters, digits, '.', '_' or '-' (a directory name)")
    return value


def _flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise SpecError(f"spec key '{key}': expected true or false, got {value!r}")
    return value


def _overrides(value: Any, key: str, allow_empty: bool = False, owned: Sequence[str] = OWNED_KEYS) -> list[str]:
    where = key if key == CLI else f"spec key '{key}'"
    if value is None or (isinstance(value, (list, tuple)) and not value and not allow_empty):
        raise SpecError(f"{where}: an arm needs at least one key=value override (what makes it an arm)")
    if not isinstance(value, (list, tuple)):
        raise SpecError(f"{where}: expected a list of key=value strings, got {value!r}")
    for item in value:
        if not isinstance(item, str) or "=" not in item:
            raise SpecError(f"{where}: {item!r} is not key=value, e.g. memory.kind=lora_ffn")
        name = item.split("=", 1)[0].strip()
        if name in OWNED_KEYS:
            raise SpecError(f"{where}: {name} is set by the study itself for every arm x seed "
                            f"(it owns {', '.join(OWNED_KEYS)})")
        if name in owned:
            raise SpecError(f"{where}: {name} is one for the whole study: set it in base.overrides")
    return list(value)


def _arms(value: Any) -> list[Arm]:
    if not isinstance(value, list) or not value:
        raise SpecError(f"spec key 'arms': expected a non-empty list of {{name, overrides}}, got {value!r}")
    arms: list[Arm] = []
    for i, item in enumerate(value):
        item = _mapping(item, f"arms[{i}]", required=True)
        _known(item, ("name", "overrides"), f"arms[{i}].")
        overrides = _overrides(item.get("overrides"), f"arms[{i}].overrides", owned=(*OWNED_KEYS, *STUDY_WIDE_KEYS))
        arm = Arm(_name(item.get("name"), f"arms[{i}].name"), overrides)
        if any(a.name == arm.name for a in arms):
            raise SpecError(f"spec key 'arms[{i}].name': {arm.name!r} is already the name of an earlier arm")
        arms.append(arm)
    return arms


def _seeds(value: Any) -> list[int]:
    if not isinstance(value, list) or not value:
        raise SpecError(f"spec key 'seeds': expected a non-empty list of integers >= 0, e.g. [0, 1], got {value!r}")
    for seed in value:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise SpecError(f"spec key 'seeds': {seed!r} is not an integer >= 0")
    if len(set(value)) != len(value):
        raise SpecError(f"spec key 'seeds': {value} repeats a seed")
    return list(value)


def _synth(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    value = _mapping(value, "synth")
    _known(value, tuple(SYNTH_KEYS), "synth.")
    out = {}
    for key, kind in SYNTH_KEYS.items():
        if key in value:
            ok = isinstance(value[key], (int, float) if kind is float else int) and not isinstance(value[key], bool)
            if not ok:
                raise SpecError(f"spec key 'synth.{key}': expected a number, got {value[key]!r}")
            out[key] = kind(value[key])
    return out
