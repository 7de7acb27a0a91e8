"""Every config composes, typos fail at composition, values are validated with named keys."""

from __future__ import annotations

import itertools

import pytest
from fixtures.runner import run_python
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf import OmegaConf

from pipeline.run.config import (
    CONF_DIR,
    TextEncoderConfig,
    check_keys,
    compose,
    config_error_message,
    config_hash,
    register_configs,
    validate,
)

GROUPS = {
    g: sorted(p.stem for p in (CONF_DIR / g).glob("*.yaml")) for g in ("source", "schedule", "ray")
}
REQUIRED = ["source.urls=/d/a-{000..009}.tar", "output.dir=/tmp/out"]


def test_groups_have_the_documented_choices():
    assert GROUPS == {
        "source": ["arrays", "images"],
        "schedule": ["cosine", "flow", "linear", "scaled_linear", "sigmoid"],
        "ray": ["cluster", "local"],
    }


@pytest.mark.parametrize("source,schedule,ray", list(itertools.product(*GROUPS.values())))
def test_every_config_composes_and_validates(source, schedule, ray):
    cfg = compose([f"source={source}", f"schedule={schedule}", f"ray={ray}", *REQUIRED])
    validate(cfg)
    assert cfg.source.kind == source and cfg.schedule.name == schedule
    assert cfg.source.urls == "/d/a-{000..009}.tar"


def test_config_files_are_small():
    for path in CONF_DIR.rglob("*.yaml"):
        assert path.stat().st_size < 2048, f"{path} is over 2 KB: split it"


PRECOMPUTE_GROUPS = ("source", "schedule", "ray", "encoder", "text")
PRECOMPUTE_YAMLS = [
    CONF_DIR / "config.yaml",
    *(p for g in PRECOMPUTE_GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))),
]
# The schema leaves that hold a value: what no YAML sets, its home in code (the read limits:
# pipeline/read/tarstream.py; keep: pipeline/read/conditioning.py) or the schema (a kind).
SCHEMA_VALUES = {
    "source": {"kind", "max_member_bytes", "shard_timeout_s", "keep", "require", "class_names"},
    "encoder": {"kind"},
}


def _leaves(tree: dict, prefix: str = "") -> dict:
    """Dotted key -> value of every leaf of a nested dict (``???`` for a required value)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _sets(tree: dict, key: str) -> bool:
    """Whether a YAML file's tree sets the dotted ``key``."""
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


@pytest.mark.parametrize("path", PRECOMPUTE_YAMLS, ids=lambda p: str(p.relative_to(CONF_DIR)))
def test_each_default_has_one_home(path):
    """As conf/validate.yaml (tests/test_validate_config.py): a schema leaf is ``???`` (its type
    only) and every file extending the schema sets it, or it holds its value (SCHEMA_VALUES) and
    no file sets it. A value stated twice could drift; a key a file stops setting reads ``???``."""
    raw = OmegaConf.to_container(OmegaConf.load(path))
    base = raw.pop("defaults")[0]  # the schema the file extends, e.g. base_flow
    raw.pop("hydra", None)
    group = "" if path.parent == CONF_DIR else path.parent.name
    register_configs()
    node = ConfigStore.instance().load(f"{group}/{base}.yaml".lstrip("/")).node
    schema = _leaves(OmegaConf.to_container(node))
    if not group:  # config.yaml: the groups come from their own files
        assert all(OmegaConf.is_missing(node, g) for g in PRECOMPUTE_GROUPS)
        schema = {k: v for k, v in schema.items() if k.split(".")[0] not in PRECOMPUTE_GROUPS}
    valued = {k for k, v in schema.items() if v != "???"}
    assert valued == SCHEMA_VALUES.get(group, set()), "a schema default: move it to the YAML"
    unset = [k for k in schema if k not in valued and not _sets(raw, k)]
    twice = [k for k in valued if _sets(raw, k)]
    assert not unset, f"{path.name} leaves {unset} unset (???): give each its value"
    assert not twice, f"{path.name} restates {twice}, whose default is in the code"
    stray = [k for k in _leaves(raw) if not any(k == s or k.startswith(s + ".") for s in schema)]
    assert not stray  # schedule.params.* sit under the dict-valued params


def test_text_presets_state_only_what_differs_from_an_encoders_defaults():
    """text.encoders items are TextEncoderConfig, whose defaults users rely on when they write
    their own list: a preset restating one would be a second home."""
    element = OmegaConf.to_container(OmegaConf.structured(TextEncoderConfig))
    for path in sorted((CONF_DIR / "text").glob("*.yaml")):
        for item in OmegaConf.to_container(OmegaConf.load(path))["encoders"]:
            assert "name" in item and set(item) <= set(element), path.name
            restated = [k for k, v in item.items() if k != "name" and v == element[k]]
            assert not restated, f"{path.name}: {item['name']} restates its default {restated}"


def test_required_values_are_missing_until_given():
    cfg = compose([])
    assert OmegaConf.is_missing(cfg.source, "urls") and OmegaConf.is_missing(cfg.output, "dir")


@pytest.mark.parametrize(
    "override",
    [
        "source.resolutoin=64",
        "output.dtyp=float16",
        "batch_size=many",
        "ray.num_actors=two",
        "sampling.draws=2",
    ],
)
def test_typos_and_wrong_types_fail_at_composition(override):
    with pytest.raises(ConfigCompositionException):
        compose([*REQUIRED, override])


def test_required_values_are_named_with_their_fix():
    with pytest.raises(ConfigCompositionException) as err:
        check_keys(compose([]))
    message = config_error_message(err.value)
    assert "config key output.dir is required: add output.dir=" in message
    assert "config key source.urls is required: add source.urls=" in message
    check_keys(compose(REQUIRED))


@pytest.mark.parametrize(
    "override,key,near",
    [
        ("+sampling.draw_per_sample=2", "sampling.draw_per_sample", "sampling.draws_per_sample"),
        ("++output.dtyp=float16", "output.dtyp", "output.dtype"),
        ("+source.resolutoin=64", "source.resolutoin", "source.resolution"),
        ("+ray.gpus=1", "ray.gpus", None),
        ("+sed=1", "sed", "seed"),
    ],
)
def test_keys_added_with_plus_must_be_in_the_schema(override, key, near):
    """Hydra adds ``+key=`` past struct mode; the schema check after composition refuses it."""
    with pytest.raises(ConfigCompositionException) as err:
        compose([*REQUIRED, override])
    message = config_error_message(err.value)
    assert message.startswith(f"config key {key}: not a key of") and "\n" not in message
    assert near is None or f"did you mean {near}?" in message


def test_override_grammar_errors_are_one_line_naming_the_override():
    with pytest.raises(OverrideParseException) as err:
        compose([*REQUIRED, "source.urls=[unclosed"])
    message = config_error_message(err.value)
    assert "'source.urls=[unclosed'" in message and "\n" not in message


@pytest.mark.parametrize("urls", ["-", "[/d/a.tar,-]", "/d/a.tar::-"])
def test_stdin_is_not_a_shard(urls):
    """WebDataset reads "-" from stdin: the driver would block, and actors have no stdin."""
    cfg = compose(["source=arrays", f"source.urls={urls}", "output.dir=/tmp/out"])
    with pytest.raises(ValueError, match=r"source\.urls: '-' \(standard input\)"):
        validate(cfg)


@pytest.mark.parametrize(
    "override,key",
    [
        ("output.dtype=bfloat16", "output.dtype"),
        ("sampling.draws_per_sample=0", "sampling.draws_per_sample"),
        ("sampling.timesteps=sobol", "sampling.timesteps"),
        ("source.resolution=0", "source.resolution"),
        ("source.channels=2", "source.channels"),
        ("on_error=ignore", "on_error"),
        ("batch_size=0", "batch_size"),
        ("ray.device=tpu", "ray.device"),
        ("ray.num_actors=0", "ray.num_actors"),
        ("output.compression=lzma", "output.compression"),
        ("schedule.num_timesteps=0", "schedule.num_timesteps"),
        ("sampling.timesteps=logit_normal", "sampling.timesteps"),  # DDPM: a flow density
        ("output.targets=[velocity]", "output.targets"),  # not defined for DDPM
        ("output.targets=[eps2]", "output.targets"),
        ("output.targets=[v,v]", "output.targets"),
    ],
)
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        validate(compose([*REQUIRED, override]))


@pytest.mark.parametrize(
    "override,key",
    [
        ("output.targets=[v]", "output.targets"),  # v-prediction is DDPM's
        ("schedule.shift=0", "schedule.shift"),
        ("schedule.patch_size=0", "schedule.patch_size"),
        ("schedule.max_seq_len=100", "schedule.max_seq_len"),
        ("schedule.zero_terminal_snr=true", "schedule.zero_terminal_snr"),
        ("sampling.logit_std=0", "sampling.logit_std"),
    ],
)
def test_bad_flow_values_name_their_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        validate(compose([*REQUIRED, "schedule=flow", override]))


def test_flow_config_composes_with_the_densities():
    cfg = compose([*REQUIRED, "schedule=flow", "sampling.timesteps=logit_normal",
                   "schedule.dynamic_shift=true", "output.targets=[x_0,velocity]"])  # fmt: skip
    validate(cfg)
    assert cfg.schedule.shift == 1.0 and cfg.schedule.base_shift == 0.5
    assert cfg.schedule.max_shift == 1.15 and cfg.schedule.base_seq_len == 256
    assert cfg.schedule.max_seq_len == 4096 and cfg.schedule.patch_size == 2
    assert cfg.sampling.logit_std == 1.0 and cfg.sampling.mode_scale == 1.29


def test_config_hash_of_ddpm_configs_is_unchanged_by_flow_keys():
    """Hashes computed by the code before schedule=flow (f65780d): a DDPM output dir written
    then resumes; the density parameters count only with their density."""
    assert config_hash(compose(REQUIRED)) == "756fdbfe215ac481"
    cosine = ["schedule=cosine", "sampling.timesteps=stratified"]
    assert config_hash(compose([*REQUIRED, *cosine])) == "8917b02d1348893e"
    x0 = ["output.store_x0=true", "source=arrays"]
    assert config_hash(compose([*REQUIRED, *x0])) == "07914df98f0456b2"
    assert config_hash(compose([*REQUIRED, "source=arrays", "output.targets=[x_0]"])) == (
        "07914df98f0456b2"  # x_0 is store_x0
    )
    assert config_hash(compose([*REQUIRED, "sampling.logit_std=2"])) == "756fdbfe215ac481"
    assert config_hash(compose([*REQUIRED, "output.targets=[v]"])) != "756fdbfe215ac481"
    flow = config_hash(compose([*REQUIRED, "schedule=flow", "sampling.timesteps=logit_normal"]))
    assert flow != config_hash(compose([*REQUIRED, "schedule=flow"]))
    shifted = ["schedule=flow", "sampling.timesteps=logit_normal", "sampling.logit_std=2"]
    assert config_hash(compose([*REQUIRED, *shifted])) != flow


def test_config_hash_ignores_execution_settings_only():
    base = config_hash(compose(REQUIRED))
    for same in (
        "ray.num_actors=3",
        "batch_size=7",
        "output.dir=/elsewhere",
        "source.urls=/x.tar",
        "progress=false",
    ):
        assert config_hash(compose([*REQUIRED, same])) == base, same
    for other in (
        "seed=1",
        "schedule=cosine",
        "output.dtype=float32",
        "sampling.draws_per_sample=2",
        "source.resolution=64",
    ):
        assert config_hash(compose([*REQUIRED, other])) != base, other


def test_cli_cfg_job_and_help_work_like_hydra():
    res = run_python(
        "-m",
        "pipeline.precompute",
        "--cfg",
        "job",
        "source.urls=/d/train-{000000..000099}.tar",
        "output.dir=/tmp/o",
        "schedule=cosine",
    )
    assert res.returncode == 0, res.stderr
    job = OmegaConf.create(res.stdout)
    assert job.source.urls == "/d/train-{000000..000099}.tar" and job.schedule.name == "cosine"
    res = run_python("-m", "pipeline.precompute", "--help")
    assert (
        res.returncode == 0
        and "source:   images | arrays" in res.stdout
        and "urls: ???" in res.stdout
    )


def test_cli_typo_fails_before_ray_starts():
    res = run_python(
        "-m",
        "pipeline.precompute",
        "source.urls=/x.tar",
        "output.dir=/tmp/o",
        "output.dtyp=float16",
        timeout=60,
    )
    assert res.returncode == 2 and "output.dtyp" in res.stderr and "Traceback" not in res.stderr
    res = run_python(
        "-m",
        "pipeline.precompute",
        "source.urls=/x.tar",
        "output.dir=/tmp/o",
        "output.dtype=int8",
        timeout=60,
    )
    assert res.returncode == 2 and "output.dtype" in res.stderr
