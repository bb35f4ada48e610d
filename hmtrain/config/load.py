"""Load a config: schema defaults <- YAML preset <- `key=value` overrides, then validate.

A preset is a path to a YAML file or the name of one in the repository's `configs/`.
Errors name the offending key so a typo in a 64-node launch fails before any work.
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, fields
from enum import Enum
from pathlib import Path
from typing import Any, Sequence, get_args

from omegaconf import ListConfig, OmegaConf, ValueNode
from omegaconf.errors import OmegaConfBaseException

from hmtrain.config.checks import Choice, ConfigError
from hmtrain.config.hf import resolve_hf_model
from hmtrain.config.model import Family
from hmtrain.config.parallel import ENGINES_NOT_OFFERED, Engine
from hmtrain.config.root import Config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def find_yaml(name_or_path: str, directory: Path) -> Path | None:
    """A YAML file given by its path, or by its name (with or without `.yaml`) in `directory`; None if neither."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    return next((c for c in (directory / name_or_path, directory / f"{name_or_path}.yaml") if c.is_file()), None)


def resolve_preset(name_or_path: str) -> Path:
    found = find_yaml(name_or_path, CONFIG_DIR)
    if found is not None:
        return found
    presets = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {name_or_path!r}: no such file, and not a preset (presets: {', '.join(presets)})")


def load_config(preset: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Merge schema defaults, a YAML preset and dotted `key=value` overrides into a Config."""
    merged = OmegaConf.structured(Config)
    if preset is not None:
        path = resolve_preset(str(preset))
        try:
            loaded = OmegaConf.load(path)
        except Exception as exc:  # yaml errors carry the line number
            raise ConfigError(f"config {path}: not valid YAML: {exc}") from exc
        merged = _merge(merged, loaded, f"config {path}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.global_batch_size=8")
        key = item.split("=", 1)[0]
        try:
            known = OmegaConf.select(merged, key, default=_MISSING) is not _MISSING
        except OmegaConfBaseException as exc:
            raise ConfigError(_describe(exc, f"override {item!r}")) from exc
        if not known:
            raise ConfigError(f"override {item!r}: unknown key {key!r}{_did_you_mean(key)}")
        merged = _merge(merged, OmegaConf.from_dotlist([item]), f"config key {key!r}")
    config: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    if config.model.family == Family.hf:  # its sizes are the model's own (hmtrain/config/hf.py)
        resolve_hf_model(config.model)
    validate(config)
    return config


_MISSING = object()


def _did_you_mean(key: str) -> str:
    from hmtrain.config.keys import config_keys  # (it reads the dataclasses' source: only on this error)

    close = difflib.get_close_matches(key, [k.name for k in config_keys()], n=3, cutoff=0.75)
    return f"; did you mean {' or '.join(repr(k) for k in close)}?" if close else " (hmtrain config keys lists them)"


def _merge(base, source, where: str):
    """`where` names the source (a file, an override's key) should omegaconf not name the key."""
    try:
        return OmegaConf.merge(base, source)
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc, where, _list_element(base, source))) from exc


def _describe(exc: OmegaConfBaseException, where: str, element: str | None = None) -> str:
    """One line in hmtrain's words: the key, and for a choice the values it allows. omegaconf names a key
    inside a list element relative to the element: `element` is that element's own key."""
    key = getattr(exc, "full_key", None)
    if key and str(key).split(".")[0].split("[")[0] not in _SECTIONS:
        key = f"{element}.{key}" if element else None
    named = f"config key {key!r}" if key else where
    choice = _choice_of(exc)
    if choice is not None and not isinstance(getattr(exc, "value", None), choice):
        if choice is Engine and str(exc.value) in ENGINES_NOT_OFFERED:
            return f"{named}: {exc.value!r}: {ENGINES_NOT_OFFERED[str(exc.value)]}"
        return f"{named}: must be {choice.names()}, got {exc.value!r}"
    value = getattr(exc, "value", None)
    value = value._value() if isinstance(value, ValueNode) else value  # omegaconf may hand over its node
    if isinstance(getattr(exc, "child_node", None), ListConfig) and isinstance(value, str):
        return f"{named}: expected a list in brackets, e.g. [8,8], got {value!r}"
    return f"{named}: {str(exc).splitlines()[0]}"


def _list_element(base, source) -> str | None:
    """The first list element (e.g. memory_model.stages[1]) of `source` that does not merge into `base`."""
    def lists(prefix: str, node: Any):
        for key, value in node.items() if isinstance(node, dict) else ():
            path = f"{prefix}.{key}" if prefix else str(key)
            yield from [(path, value)] if isinstance(value, list) else lists(path, value)

    for path, items in lists("", OmegaConf.to_container(source)):
        for i in range(len(items)):
            nested: Any = items[: i + 1]
            for part in reversed(path.split(".")):
                nested = {part: nested}
            try:
                OmegaConf.merge(base, OmegaConf.create(nested))
            except OmegaConfBaseException:
                return f"{path}[{i}]"
    return None


_SECTIONS = {f.name for f in fields(Config)}


def _choice_of(exc: OmegaConfBaseException) -> type[Choice] | None:
    """The Choice a rejected value was meant to be: an Enum field, or an element of a list of them."""
    choice = getattr(getattr(exc, "child_node", None), "enum_type", None)
    if choice is None:
        args = get_args(getattr(exc, "ref_type", None))
        choice = args[0] if len(args) == 1 else None
    return choice if isinstance(choice, type) and issubclass(choice, Choice) else None


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def flatten(config: Config) -> dict[str, Any]:
    """Dotted keys -> values, e.g. for MLflow params; a choice is its plain name."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            out[prefix] = _plain(node)

    walk("", asdict(config))
    return out


def _plain(value: Any) -> Any:
    """A choice as its name, also inside lists (stages, freeze): what an older run's config.yaml holds."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def validate(config: Config) -> None:
    """Checks that types alone cannot express (each section's own, then those spanning sections)."""
    config.validate()
