"""The validator's config: validate.yaml extends the ValidateConfig schema, so typos and wrong
types fail at composition (exit code 2 before any dataset or Ray); values name their key."""

from __future__ import annotations

import re

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from pipeline import validate
from pipeline.run.config import CONF_DIR
from pipeline.validate.config import ValidateConfig, check_values

REQUIRED = ["output.dir=/tmp/dataset"]


def _leaves(tree: dict, prefix: str = "") -> dict:
    """Dotted key -> value of every leaf of a nested dict (``???`` for a required value)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_every_key_of_validate_yaml_composes_with_its_schema_type():
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "validate.yaml"))
    assert raw.pop("defaults") == ["validate_schema", "_self_"]
    yaml = _leaves(raw)
    schema = _leaves(OmegaConf.to_container(OmegaConf.structured(ValidateConfig)))
    assert set(yaml) == set(schema)  # no key the schema lacks, none left undocumented
    # one home for the defaults: the schema holds none (every leaf ???), the YAML sets each
    assert set(schema.values()) == {"???"}
    assert [k for k, v in yaml.items() if v == "???"] == ["output.dir"]
    cfg = validate.load_config(REQUIRED)
    assert OmegaConf.get_type(cfg) is ValidateConfig
    for key, value in yaml.items():
        if key != "output.dir":  # every key accepts its documented value as an override
            over = "null" if value is None else str(value).lower()  # true, false, 0.01, ...
            again = validate.load_config([*REQUIRED, f"{key}={over}"])
            assert OmegaConf.select(again, key) == OmegaConf.select(cfg, key), key
    check_values(cfg)


@pytest.mark.parametrize(
    "override",
    # "+key" adds past Hydra's struct mode: config.compose refuses keys the schema lacks
    ["bins2=3", "output.dirr=x", "ray.adress=auto", "family_corection=false", "+bins2=3"],
)
def test_typo_fails_at_composition(override):
    with pytest.raises(ConfigCompositionException):
        validate.load_config([*REQUIRED, override])


@pytest.mark.parametrize(
    "override",
    ["bins=many", "z=high", "plots=maybe", "ray.max_in_flight=two", "reservoir_size=1.5"],
)
def test_wrong_type_fails_at_composition(override):
    with pytest.raises(ConfigCompositionException):
        validate.load_config([*REQUIRED, override])


@pytest.mark.parametrize("override", ["bins2=3", "output.dirr=x", "bins=many", "z=high"])
def test_cli_exits_2_naming_the_key(override, capsys):
    assert validate.main([*REQUIRED, override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and override.split("=")[0] in err


@pytest.mark.parametrize(
    "override,key",
    [
        ("z=0", "z"),
        ("bins=0", "bins"),
        ("reservoir_size=-1", "reservoir_size"),
        ("max_consistency_records=-1", "max_consistency_records"),
        ("reconstruct_min_alpha_bar=0", "reconstruct_min_alpha_bar"),
        ("reconstruct_min_alpha_bar=1.5", "reconstruct_min_alpha_bar"),
        ("terminal_mean_shift=-0.1", "terminal_mean_shift"),
        ("terminal_window=1", "terminal_window"),
        ("batch_elements=0", "batch_elements"),
        ("ray.num_cpus_per_task=0", "ray.num_cpus_per_task"),
        ("output.dir=''", "output.dir"),
    ],
)
def test_bad_values_name_their_key(override, key):
    cfg = validate.load_config([*REQUIRED, override])
    with pytest.raises(ValueError, match=f"config key {re.escape(key)}: (must|required)"):
        check_values(cfg)


def test_output_dir_is_required():
    with pytest.raises(ValueError, match=r"config key output\.dir: required"):
        check_values(validate.load_config([]))
