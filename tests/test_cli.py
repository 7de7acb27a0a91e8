"""Both command lines as a user runs them: a config that cannot run exits 2 with one line naming
the key (no traceback), nothing is written to the working directory, stdin is never read."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures.runner import clean_env, run_python
from shards import write_image_shard


@pytest.fixture
def cwd(tmp_path) -> Path:
    """An empty working directory the process may not write (as root it still can: the tests
    check that it stays empty)."""
    d = tmp_path / "cwd"
    d.mkdir()
    d.chmod(0o555)
    return d


@pytest.mark.parametrize(
    "module,args,expected",
    [
        (
            "pipeline.precompute",
            ["source.urls=/d/a.tar"],
            "error: config key output.dir is required: add output.dir=",
        ),
        (  # Hydra's override grammar
            "pipeline.precompute",
            ["source.urls=[unclosed", "output.dir=/tmp/o"],
            "'source.urls=[unclosed'",
        ),
        (  # + adds a key past struct mode: the schema still refuses it
            "pipeline.precompute",
            ["source.urls=/d/a.tar", "output.dir=/tmp/o", "+sampling.draw_per_sample=2"],
            "config key sampling.draw_per_sample: not a key of SamplingConfig",
        ),
        ("pipeline.validate", ["output.dir=/tmp/o", "z=[5"], "'z=[5'"),
    ],
)
def test_a_config_error_exits_2_with_one_line(module, args, expected, cwd):
    res = run_python("-m", module, *args, cwd=cwd)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], res.stderr
    assert list(cwd.iterdir()) == []  # Hydra wrote no outputs/<date>/<time>/ (nor .hydra/)


@pytest.mark.parametrize(
    "sweep",
    [
        ["-m", "seed=0,1"],
        ["--multirun", "seed=0,1"],
        ["--multi", "seed=3"],
        ["hydra.mode=MULTIRUN"],
    ],
)
def test_multirun_is_refused_in_one_line_before_anything_is_written(sweep, tmp_path, cwd):
    """``-m seed=0,1`` used to exit 0 after writing only seed 0 and to leave multirun/ in the
    working directory. A sweep is refused (exit 2, one line, the shell loop to use instead);
    nothing is written, in the cwd or in output.dir."""
    write_image_shard(tmp_path / "a.tar", 2, size=(8, 8))
    out = tmp_path / "out"
    args = ["source=images", f"source.urls={tmp_path}/a.tar", f"output.dir={out}", *sweep]
    res = run_python("-m", "pipeline.precompute", *args, cwd=cwd, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: multirun (-m) is not supported")
    if sweep[-1] == "seed=0,1":
        assert (
            "for v in 0 1; do diffusion-precompute ... seed=$v output.dir=out/seed-$v" in lines[0]
        )
    assert list(cwd.iterdir()) == [] and not out.exists()


def test_stdin_as_a_shard_is_refused_not_read(tmp_path):
    """``source.urls=-`` would make the driver wait on its stdin (WebDataset's "-"); stdin stays
    open here, so reading it would block until the timeout."""
    log = tmp_path / "stderr"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.precompute", "source=arrays", "source.urls=-"]
            + [f"output.dir={tmp_path / 'out'}", "progress=false"],
            cwd=tmp_path,
            env=clean_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            rc = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("the driver blocked (reading its stdin?)")
        finally:
            proc.stdin.close()
    assert rc == 2 and "config key source.urls: '-' (standard input)" in log.read_text()


_DRIVER_WITHOUT_TORCH = """
import runpy
import sys

def loaded():
    return sorted({m.split(".")[0] for m in sys.modules} & {"torch", "webdataset"})

def command(module, *args):
    \"\"\"``python -m module args`` in this process; its exit code.\"\"\"
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return exc.code
    return 0

import pipeline.precompute as pc
from pipeline.run.config import compose

assert not loaded(), f"import pipeline.precompute loaded {loaded()}"
images, arrays, out = sys.argv[1:]
with pc.ray_session(None, num_cpus=1):  # one embedded Ray for both jobs
    code = command("pipeline.precompute", f"source.urls={images}", "source.resolution=8",
                   f"output.dir={out}/images", "ray.num_actors=1", "progress=false")
    assert code == 0, f"the images command exited {code}"
    assert not loaded(), f"the images job loaded {loaded()} in the driver"
    cfg = compose(["progress=false", f"output.dir={out}/arrays", "source=arrays",
                   f"source.urls={arrays}", "source.shape=[2,4,4]"])
    manifest = pc.run(cfg)
    assert manifest["exit_code"] == 0, manifest["totals"]
    assert manifest["totals"]["records"] == 3, manifest["totals"]
    assert not loaded(), f"the arrays job loaded {loaded()} in the driver"
# the validation's command line, with no Ray left running (as when it runs on its own)
code = command("pipeline.validate", f"output.dir={out}/images", "progress=false", "plots=false",
               "max_consistency_records=0")
assert code in (0, 1), f"the validation exited {code}"
"""


@pytest.mark.slow
def test_no_writes_to_the_cwd_and_no_torch_in_the_driver(tmp_path, cwd):
    """From a read-only empty working directory, one interpreter (one embedded Ray, as the
    jobs share it): the precompute's command line on images, an arrays job whose shape is
    configured, then the validation's command line. Nothing is written to the working
    directory (no Hydra outputs/); torch (~1 s of the driver's imports) and webdataset (whose
    __init__ imports torch) load in the actors only: neither ``import pipeline.precompute`` nor
    either job loads them in the driver process."""
    from shards import write_array_shard

    write_image_shard(tmp_path / "img-0.tar", 3, size=(12, 10))
    write_array_shard(tmp_path / "arr-0.tar", 3, shape=(2, 4, 4))
    out = tmp_path / "out"
    res = run_python(
        "-c",
        _DRIVER_WITHOUT_TORCH,
        str(tmp_path / "img-{0..0}.tar"),
        str(tmp_path / "arr-0.tar"),
        str(out),
        cwd=cwd,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "shards: 1 (1 ok, 0 partial, 0 failed)" in res.stdout  # the command's summary
    assert "samples: 3  records: 3" in res.stdout
    assert (out / "images" / "img-0.parquet").exists()
    assert (out / "arrays" / "arr-0.parquet").exists()
    assert (out / "images" / "validation" / "report.json").exists()
    assert list(cwd.iterdir()) == []


def test_a_missing_shard_or_an_empty_pattern_exits_2_at_once(tmp_path, cwd):
    """Refused on the driver before Ray starts, naming the first missing path or the pattern."""
    out = f"output.dir={tmp_path / 'out'}"
    t0 = time.perf_counter()
    res = run_python("-m", "pipeline.precompute", "source=arrays",
                     f"source.urls={tmp_path}/a-{{0..1}}.tar", out, cwd=cwd)  # fmt: skip
    assert res.returncode == 2 and f"shard {tmp_path}/a-0.tar does not exist" in res.stderr
    res = run_python(
        "-m", "pipeline.precompute", f"source.urls={tmp_path}/crops-*.tar", out, cwd=cwd
    )
    assert res.returncode == 2 and f"'{tmp_path}/crops-*.tar' matches no file" in res.stderr
    assert time.perf_counter() - t0 < 30  # two interpreter starts; no Ray, no retries


def test_an_actor_no_node_can_hold_is_refused_naming_the_resources(tmp_path, cwd):
    """ray.gpus_per_actor=1 on an embedded Ray without GPUs: exit 2 in seconds (not after
    ray.actor_start_timeout_s), naming what is asked, what the node has and the override."""
    write_image_shard(tmp_path / "img-0.tar", 2, size=(16, 16))
    t0 = time.perf_counter()
    res = run_python("-m", "pipeline.precompute", f"source.urls={tmp_path}/img-0.tar",
                     "source.resolution=8", f"output.dir={tmp_path / 'out'}",
                     "ray.gpus_per_actor=1", "progress=false", cwd=cwd, timeout=120)  # fmt: skip
    elapsed = time.perf_counter() - t0
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "each actor asks for 1 CPU and 1 GPU" in res.stderr and " 0 GPU" in res.stderr
    assert "set ray.gpus_per_actor=0" in res.stderr and elapsed < 60, (elapsed, res.stderr)


def test_validate_takes_the_directory_as_a_positional_argument(tmp_path, cwd):
    from pipeline.validate.cli import positional_dir

    assert positional_dir(["/o/rec", "plots=false"]) == ["output.dir='/o/rec'", "plots=false"]
    assert positional_dir(["it's"]) == ["output.dir='it\\'s'"]
    assert positional_dir(["output.dir=/o", "x=1"]) == ["output.dir=/o", "x=1"]
    assert positional_dir(["--help"]) == ["--help"]
    res = run_python(
        "-m", "pipeline.validate", str(tmp_path / "no-records"), "plots=false", cwd=cwd
    )
    assert res.returncode == 2 and "no-records" in res.stderr, res.stderr
    assert "grammar" not in res.stderr.lower() and "mismatched input" not in res.stderr
