"""The wheel runs: built from the working tree, installed into a separate directory and run from
elsewhere, both command lines find their Hydra configs (they ship inside the package) and a
one-shard job writes its Parquet file.

Offline: ``pip wheel --no-build-isolation`` uses the venv's setuptools; the venv's site-packages
provide the dependencies (``--no-deps``), ``PYTHONPATH`` the installed package.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from fixtures.runner import clean_env, run_python
from shards import write_image_shard

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _pip(*args: str) -> None:
    pip = ("-m", "pip", "--disable-pip-version-check", "--no-input", "-q")
    res = run_python(*pip, *args, env=clean_env(pythonpath=None))
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The wheel of the working tree installed into its own directory (not the editable one)."""
    tmp = tmp_path_factory.mktemp("wheel")
    # build from a copy: the build writes build/ and *.egg-info next to pyproject.toml
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "pipeline", src / "pipeline", ignore=shutil.ignore_patterns("__pycache__")
    )
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src))
    (wheel,) = (tmp / "dist").glob("diffusion_precompute-*.whl")
    _pip("install", "--no-deps", "--target", str(tmp / "site"), str(wheel))
    return tmp / "site"


def _run(site: Path, cwd: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    # PYTHONPATH: not the repository, the installed package only
    return run_python(*args, cwd=cwd, env=clean_env(pythonpath=site), timeout=timeout)


def test_the_wheel_holds_the_configs(site):
    conf = site / "pipeline" / "conf"
    names = {p.relative_to(conf).as_posix() for p in conf.rglob("*.yaml")}
    assert {
        "config.yaml",
        "validate.yaml",
        "hydra/help/precompute.yaml",
        "source/images.yaml",
        "schedule/linear.yaml",
        "ray/local.yaml",
    } <= names


def test_installed_command_lines_run_from_another_directory(site, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    # the installed package, not the repository's (editable install, or the cwd on sys.path)
    res = _run(site, cwd, "-c", "import importlib.util as u; print(u.find_spec('pipeline').origin)")
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()) == site / "pipeline" / "__init__.py"

    res = _run(site, cwd, "-m", "pipeline.precompute", "--help")
    assert res.returncode == 0, res.stderr
    assert "source:   images | arrays" in res.stdout and "urls: ???" in res.stdout
    res = _run(site, cwd, "-m", "pipeline.validate", "--help")
    assert res.returncode == 0, res.stderr
    assert "reservoir_size:" in res.stdout

    shard = tmp_path / "shards" / "a-000000.tar"
    shard.parent.mkdir()
    write_image_shard(shard, 3, size=(12, 10))
    out = tmp_path / "out"
    res = _run(
        site,
        cwd,
        "-m",
        "pipeline.precompute",
        f"source.urls={shard}",
        "source.resolution=8",
        f"output.dir={out}",
        "ray.num_actors=1",
        "progress=false",
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert list(out.rglob("*.parquet")), sorted(p.name for p in out.rglob("*"))
    assert list(cwd.iterdir()) == []
