"""Where the validator's scans run (pipeline/validate/executor.py): Ray tasks or a local process
pool give the same report; auto picks the pool when no Ray runs here; a scan process that dies is
retried alone, then reported, and costs no other shard."""

from __future__ import annotations

import json
import os
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool

import pytest
from fixtures.runner import run_python
from shards import write_image_shard

from pipeline import validate
from pipeline.precompute import run as precompute
from pipeline.run.config import compose
from pipeline.validate import executor
from pipeline.validate.scan import scan_shard

DIE_ON = "sh-1"  # the shard whose scan process dies in the tests below


def dying_scan(out, shard, plan):
    """executor.scan_task, except that the scan of DIE_ON kills its process."""
    if shard == DIE_ON:
        os._exit(9)
    return scan_shard(out, shard, plan)


def dying_once_scan(out, shard, plan):
    """executor.scan_task, except that the first scan of DIE_ON kills its process (the pool's
    processes share no memory with the test: a file beside the dataset says it died)."""
    marker = os.path.join(os.path.dirname(out.root), "died-once")
    if shard == DIE_ON and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(9)
    return scan_shard(out, shard, plan)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("executor")
    for i in range(3):
        write_image_shard(root / f"sh-{i}.tar", 24, size=(20, 16), seed=i, key_prefix=f"k{i}_")
    cfg = compose([
        "progress=false", "source=images", "source.resolution=16",
        f"source.urls={root}/sh-{{0..2}}.tar", f"output.dir={root / 'out'}",
        "schedule.num_timesteps=100", "sampling.draws_per_sample=2", "ray.num_actors=1",
    ])  # fmt: skip
    assert precompute(cfg)["exit_code"] == 0
    return root / "out"


def _run(path, *overrides) -> dict:
    cfg = validate.load_config(
        [f"output.dir={path}", "progress=false", "plots=false", *overrides]
    )  # fmt: skip
    return validate.run(cfg)


def _verdicts(report: dict) -> str:
    """The report without what may differ between runs: timings and the executor's name."""
    r = {k: v for k, v in report.items() if k not in ("seconds", "config", "report_dir")}
    r["summary"] = {k: v for k, v in r["summary"].items() if k not in ("cost_seconds", "executor")}
    return json.dumps(r, sort_keys=True)


def test_auto_is_local_without_a_ray_and_ray_with_one(ray_session):
    assert executor.choose("auto", None) == "ray"  # this process runs the session's Ray
    assert executor.choose("auto", "auto") == executor.choose("ray", None) == "ray"
    assert executor.choose("local", "auto") == "local"
    code = "from pipeline.validate.executor import choose; print(choose('auto', None))"
    out = run_python("-c", code)
    assert out.returncode == 0 and out.stdout.strip() == "local", out.stderr


def test_local_pool_and_ray_tasks_give_the_same_report(dataset, ray_session):
    on_ray = _run(dataset, "executor=ray")
    local = _run(dataset, "executor=local", "workers=2")
    assert on_ray["passed"] and local["passed"]
    assert on_ray["summary"]["executor"] == "ray" and local["summary"]["executor"] == "local"
    assert _verdicts(local) == _verdicts(on_ray)
    assert "ray_start" not in local["summary"]["cost_seconds"]["wall"]


def test_a_scan_process_that_dies_once_is_retried_alone(dataset, monkeypatch):
    monkeypatch.setattr(executor, "scan_task", dying_once_scan)
    report = _run(dataset, "executor=local", "workers=2")
    assert (dataset.parent / "died-once").exists()  # it did die once
    assert report["passed"] and report["summary"]["scanned_shards"] == 3


def test_a_scan_process_that_always_dies_fails_only_its_shard(dataset, monkeypatch):
    monkeypatch.setattr(executor, "scan_task", dying_scan)
    report = _run(dataset, "executor=local", "workers=2")
    checks = {c["name"]: c for c in report["checks"]}
    assert not checks["completeness"]["passed"]
    assert "died" in json.dumps(checks["completeness"]["detail"])
    assert report["summary"]["records"] == 2 * 24 * 2  # the other two shards, both draws
    failed = {c["name"] for c in report["checks"] if not c["passed"]}
    assert failed == {"completeness"}


class _PoolThatBreaks:
    """A stand-in for ProcessPoolExecutor: shard "a" scans, the process of shard "b" dies while
    "a" is collected, so the next submit raises BrokenProcessPool (as the real pool does once a
    process died) and b's future ends in error."""

    def __init__(self):
        self.futures = {}

    def submit(self, fn, out, shard, plan):
        if len(self.futures) == 2:
            self.futures["b"].set_exception(BrokenProcessPool("a child process terminated"))
            raise BrokenProcessPool("a child process terminated")
        fut = self.futures[shard] = Future()
        if shard == "a":
            fut.set_result(f"stats of {shard}")
        return fut


def test_a_pool_that_broke_between_two_waits_returns_what_is_left():
    """A scan process that dies between two waits breaks the pool before the next submit: the
    window keeps the finished scans and returns the lost one and those not submitted, to be
    retried (it raised BrokenProcessPool out of the validator before)."""
    folded = []
    order = executor._InOrder(lambda i, st: folded.append((i, st)), lambda n: None)
    todo = [(0, "a"), (1, "b"), (2, "c"), (3, "d")]
    left, lost = executor._run_window(_PoolThatBreaks(), 2, None, todo, None, order)
    assert folded == [(0, "stats of a")]
    assert lost == [(1, "b")] and left == [(2, "c"), (3, "d")]


@pytest.mark.parametrize("bad", ["executor=dask", "workers=0"])
def test_bad_executor_settings_name_their_key(dataset, bad):
    with pytest.raises(validate.CannotValidate, match=bad.split("=")[0]):
        _run(dataset, bad)


def test_the_driver_reads_no_marker_the_scans_do(dataset, monkeypatch):
    """Markers are read by each shard's scan, in parallel, not one by one on the driver (on an
    object store, 100,000 shards would be 100,000 requests in a row)."""
    from pipeline.output.manifest import OutputDir

    read, names = OutputDir.read_json, []

    def spy(self, name, *a, **k):
        names.append(name)
        return read(self, name, *a, **k)

    monkeypatch.setattr(OutputDir, "read_json", spy)
    report = _run(dataset, "executor=local")
    assert report["passed"] and not [n for n in names if n.startswith("_shards/")]


def test_a_program_read_from_stdin_validates_on_ray_or_is_told_why_not(dataset):
    """Pool processes re-import __main__, as multiprocessing does: a program read from stdin
    cannot be, so auto takes Ray there and executor=local says what to do."""
    code = (
        "import sys\nfrom pipeline import executor, validate\n"
        "print(executor.choose('auto', None))\n"
        f"sys.exit(validate.main(['output.dir={dataset}', 'progress=false', 'executor=local']))\n"
    )
    res = run_python("-", input=code)
    assert res.stdout.splitlines()[0] == "ray"
    assert res.returncode == 2 and "set executor=ray" in res.stderr
