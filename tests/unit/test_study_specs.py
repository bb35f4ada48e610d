"""Every study spec shipped in configs/studies/ loads, and every arm's config is one `hmtrain train` accepts."""
from pathlib import Path

import pytest

from hmtrain.memory import memory_layers, memory_sizes
from hmtrain.memory.kind import memory_kind
from hmtrain.study.spec import check_configs, load_spec

SPECS = sorted((Path(__file__).resolve().parents[2] / "configs" / "studies").glob("*.yaml"))


def test_specs_are_shipped():
    assert {p.stem for p in SPECS} >= {"memory-kinds-tiny", "memory-layers-tiny", "tokens-per-param-tiny",
                                         "depth-tiny", "memory-kinds-dictd", "memory-vs-dense-dictd-large"}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_a_shipped_spec_loads_and_its_arms_are_valid_configs(path):
    spec = load_spec(path.stem)
    assert spec.name == path.stem and spec.arms and spec.seeds
    configs = check_configs(spec, [])
    assert set(configs) == {arm.name for arm in spec.arms}


def _fetched_per_level(cfg) -> list[int]:
    levels = memory_sizes(n_layers=len(memory_layers(cfg)), params_per_unit=memory_kind(cfg).params_per_unit,
                          branching=cfg.tree.branching, units=cfg.memory.units)
    return [level.fetched_params for level in levels]


@pytest.mark.parametrize("name", ["memory-kinds-tiny", "memory-kinds-dictd"])
def test_the_kinds_studies_compare_every_kind_at_equal_fetched_parameters(name):
    """Their results compare kinds at the same fetched parameters per level: units per kind must keep it so."""
    configs = check_configs(load_spec(name), [])
    assert {cfg.memory.kind.value for cfg in configs.values()} == {"ffn", "lora_ffn", "lora_qk", "lora_ov", "kv"}
    assert {tuple(_fetched_per_level(cfg)) for cfg in configs.values()} == {(98_304, 49_152)}
