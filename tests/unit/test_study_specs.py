"""Every study spec shipped in configs/studies/ loads, and every arm's config is one `hmtrain train` accepts."""
from pathlib import Path

import pytest

from hmtrain.study.spec import check_configs, load_spec

SPECS = sorted((Path(__file__).resolve().parents[2] / "configs" / "studies").glob("*.yaml"))


def test_specs_are_shipped():
    assert {p.stem for p in SPECS} >= {"memory-kinds-tiny", "memory-layers-tiny", "tokens-per-param-tiny",
                                         "depth-tiny"}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_a_shipped_spec_loads_and_its_arms_are_valid_configs(path):
    spec = load_spec(path.stem)
    assert spec.name == path.stem and spec.arms and spec.seeds
    configs = check_configs(spec, [])
    assert set(configs) == {arm.name for arm in spec.arms}
