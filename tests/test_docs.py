"""The documentation stays true to the code: README.md is short, every relative link and anchor of
README.md and docs/*.md resolves, every precompute config key is in docs/configuration.md, every
registered validator check is in docs/validation.md, and every module the README's module map
names exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.run.config import CONF_DIR, compose

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 250  # the front door (issue 22 item 7); reference material goes to docs/


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces -> '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # no headings in code blocks
    return {_slug(h) for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move reference material "
        "to docs/*.md and link it"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not bad, f"{page.relative_to(ROOT)}: " + "; ".join(bad)


def _leaf_keys(node, prefix: str = "") -> set[str]:
    """Dotted keys of a config's leaves; a list of dicts is ``key[]`` with its items' keys."""
    out: set[str] = set()
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= _leaf_keys(value, name + ".")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            out.add(name + "[]")
        else:
            out.add(name)
    return out


def _precompute_keys() -> set[str]:
    """Every leaf key of every option of every config group of the precompute config."""
    overrides = [
        [f"{group}={option}"]
        for group in ("source", "schedule", "ray", "encoder", "text")
        for option in _options(group)
    ]
    keys: set[str] = set()
    for ov in overrides:
        cfg = OmegaConf.to_container(compose(ov), resolve=False, throw_on_missing=False)
        cfg.pop("hydra", None)
        keys |= _leaf_keys(cfg)
    return keys


def test_every_precompute_config_key_is_documented():
    doc = (DOCS / "configuration.md").read_text()
    documented = set(re.findall(r"`([a-z_][\w.\[\]*]*)`", doc))
    missing = []
    for key in sorted(_precompute_keys()):
        group, _, leaf = key.partition(".")
        if leaf in ("kind", "name"):  # the group's choice: documented as the group's row
            key = group
        forms = {key, key.removesuffix("[]") + "[]"}  # a list of dicts: `key[]`
        if "." in key:
            forms.add(f"{key.rsplit('.', 1)[0]}.*")  # a family: `schedule.params.*`
        if not forms & documented:
            missing.append(key)
    assert not missing, (
        f"config keys not documented in docs/configuration.md: {missing}; add a row "
        "(`key` | `default` | meaning) to its table"
    )


def test_every_check_is_documented():
    from pipeline.validate.checks import CHECKS

    doc = (DOCS / "validation.md").read_text()
    missing = [c.NAME for c in CHECKS if f"| `{c.NAME}` |" not in doc]
    assert not missing, f"checks without a row in docs/validation.md's table: {missing}"


def test_readme_module_map_names_existing_modules():
    text = README.read_text()
    rows = re.findall(r"^\| (`[^|]+`) \|", text, flags=re.M)
    names = [n for row in rows for n in re.findall(r"`([\w/]+(?:\.py)?/?)`", row)]
    assert len(names) > 10, "README.md's module map was not found"
    missing = [n for n in names if not (ROOT / "pipeline" / n).exists()]
    assert not missing, f"README.md's module map names modules that do not exist: {missing}"


def test_readme_module_map_lists_every_module():
    text = README.read_text()
    named = set(re.findall(r"`([\w/]+\.py|\w+/)`", text))
    pkg = ROOT / "pipeline"
    modules = [p.name for p in pkg.glob("*.py") if p.name != "__init__.py"]
    for sub in (p for p in pkg.iterdir() if (p / "__init__.py").exists()):
        modules.append(sub.name + "/")
        if sub.name != "validate":  # the validator's own modules: its row names them
            modules += [f"{sub.name}/{p.name}" for p in sub.glob("*.py") if p.name != "__init__.py"]
    missing = sorted(m for m in modules if m not in named)
    assert not missing, (
        f"pipeline modules missing from README.md's module map: {missing}; add a row "
        "(`module.py` | its one responsibility)"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_repository_paths_exist(page):
    """A path of this repository named in the docs (`pipeline/...`, `jobs/...`, `tests/...`,
    `docs/...`, `conf/...`) exists: a module that moved is renamed in its docs too."""
    text = page.read_text()
    paths = re.findall(r"`((?:pipeline|jobs|tests|docs|conf)/[\w./-]+)`", text)
    missing = sorted({p for p in paths if not (ROOT / p.rstrip("/")).exists()})
    assert not missing, f"{page.relative_to(ROOT)} names paths that do not exist: {missing}"


def _architecture_example(name: str) -> str:
    """The Python block of docs/architecture.md that defines ``name``."""
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / "architecture.md").read_text(), re.S)
    (block,) = [b for b in blocks if name in b and ("class " in b or "register(" in b)][:1]
    return block


def test_architecture_worked_example_runs(tmp_path, monkeypatch, make_cfg):
    """docs/architecture.md's MeanStage and its x0_mean column, run by a worker in-process:
    each sample's mean is on each of its K records."""
    from shards import write_image_shard

    from pipeline.output import records
    from pipeline.run import worker
    from pipeline.run.config import actor_config, config_hash
    from pipeline.run.metadata import dataset_metadata, sample_shape
    from pipeline.run.stages import NoiseStage

    scope: dict = {}
    exec(_architecture_example("class MeanStage"), scope)
    monkeypatch.setattr(records, "COLUMNS", list(records.COLUMNS))  # the registry is per process
    exec(_architecture_example('register(Column("x0_mean"'), scope)

    url = str(tmp_path / "a-000000.tar")
    write_image_shard(url, 5, size=(20, 16))
    out = tmp_path / "out"
    (out / "_shards").mkdir(parents=True)
    cfg = make_cfg(f"source.urls={url}", f"output.dir={out}", "source.resolution=8",
                   "sampling.draws_per_sample=2")  # fmt: skip
    meta = dataset_metadata(cfg, sample_shape(cfg, [url]), config_hash(cfg))
    meta.extra["x0_mean"] = True  # docs/architecture.md, "Metadata"
    chain = worker.ShardWorker.stages

    def stages(self, noise):
        built = chain(self, noise)
        at = next(i for i, s in enumerate(built) if isinstance(s, NoiseStage)) + 1
        return [*built[:at], scope["MeanStage"](), *built[at:]]

    monkeypatch.setattr(worker.ShardWorker, "stages", stages)
    w = worker.ShardWorker(actor_config(cfg), meta)
    assert w.process(url).records == 10
    import pyarrow.parquet as pq

    table = pq.read_table(out / "a-000000.parquet")
    means = table.column("x0_mean").to_numpy()
    assert table.schema.field("x0_mean").type == "float" and len(set(means)) == 5
    assert (means[0::2] == means[1::2]).all()  # one value per sample, on both of its draws
