"""What clusters do to a job, each done for real to a job on the two-node loopback cluster of
tests/raycluster.py (submitted with jobs/submit.sh): an actor process killed in the middle of a
shard, a worker node removed in the middle of the job, the driver SIGKILLed and the command
re-run, a shard that can never be read; and, with the session's local Ray, an output directory
that cannot be written and a write that fails. The output must equal a clean run record for
record, with no partial or duplicate file, and nothing may hang.

Shards are held in the middle (tests/raycluster.py ``gated``: half the tar is streamed, the rest
once the test creates the gate file), so every fault strikes an actor that has records of its
shard written in a temporary file; the faults are external (os.kill of the processes found
under the cluster's nodes), nothing in the pipeline knows about tests.
"""

from __future__ import annotations

import json
import os
import re
import signal

import pytest
from fixtures.dataset import JOB_ARGS, NUM_SHARDS
from fixtures.records import assert_same_records, read_records
from raycluster import finish, gated, urls_override, wait_for, writing_actors

from pipeline.precompute import JobError, run
from pipeline.run.config import compose

ARGS, N = JOB_ARGS, NUM_SHARDS


pytestmark = pytest.mark.usefixtures("cluster_release")  # conftest: the shared cluster's end


@pytest.fixture(scope="module")
def data(small_dataset):
    return small_dataset


def held(data, gate, ids=range(N)) -> list[str]:
    return [gated(f"{data['root']}/lat-{i:02d}.tar", gate) for i in ids]


def check_output(out, data, shards=N) -> dict:
    """Records equal to the clean run; every shard committed once; no temporary file left."""
    assert_same_records(read_records(out), data["clean"])
    names = sorted(os.listdir(out)) + sorted(f"_shards/{n}" for n in os.listdir(out / "_shards"))
    assert not [n for n in names if ".tmp-" in n], names
    assert len([n for n in names if n.endswith(".parquet")]) == shards
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["complete"] and manifest["totals"]["ok"] == shards, manifest["totals"]
    return manifest


@pytest.mark.cluster
def test_actor_killed_mid_shard_is_retried_on_another_actor(cluster, data, tmp_path):
    out, gate = tmp_path / "out", tmp_path / "gate"
    job = cluster.popen_script(
        "submit.sh", *ARGS, urls_override(held(data, gate)), f"output.dir={out}"
    )
    busy = wait_for(lambda: writing_actors(cluster, out), 120, "an actor mid-shard", job)
    pid, shard = next(iter(busy.items()))
    os.kill(pid, signal.SIGKILL)
    gate.touch()
    code, stdout, stderr = finish(job)
    assert code == 0, stdout + stderr
    assert re.search(rf"actor lost \(.* while processing {shard}\): \d of 2 actors live", stdout)
    manifest = check_output(out, data)
    entry = manifest["shards"][shard]
    assert entry["attempts"] == 2 and entry["worker"]["pid"] != pid


@pytest.mark.cluster
def test_driver_killed_then_same_command_resumes(any_cluster, data, tmp_path):
    cluster = any_cluster
    out, gate = tmp_path / "out", tmp_path / "gate"
    # lat-00 and lat-01 are read freely, lat-02 and lat-03 are held in the middle
    urls = [str(data["root"] / f"lat-{i:02d}.tar") for i in (0, 1)] + held(data, gate, (2, 3))
    args = [*ARGS, urls_override(urls), f"output.dir={out}"]
    job = cluster.popen_script("submit.sh", *args)
    wait_for(
        lambda: (
            len(list((out / "_shards").glob("lat-0[01].json"))) == 2
            and writing_actors(cluster, out)
        ),
        120,
        "lat-00, lat-01 committed and a held shard in the middle",
        job,
    )
    (driver,) = cluster.nodes[0].find(lambda argv: "pipeline.precompute" in argv[1:3])
    os.kill(driver, signal.SIGKILL)
    code, stdout, stderr = finish(job)
    assert code == 128 + signal.SIGKILL, stdout + stderr  # 137: killed, re-run to resume
    committed = {n: (out / n).stat().st_mtime_ns for n in ("lat-00.parquet", "lat-01.parquet")}
    assert not (out / "lat-02.parquet").exists() and not (out / "lat-03.parquet").exists()

    gate.touch()
    r = cluster.run_script("submit.sh", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 shards, 2 already committed, 2 to do" in r.stdout
    check_output(out, data)
    assert {n: (out / n).stat().st_mtime_ns for n in committed} == committed  # untouched


@pytest.mark.cluster
def test_unreadable_shard_is_retried_then_failed_and_named(any_cluster, data, tmp_path):
    cluster = any_cluster
    out = tmp_path / "out"
    # An empty file: it exists (a missing local shard is refused before Ray starts, exit 2),
    # but its stream cannot be read, which only the worker finds.
    (tmp_path / "lat-09.tar").write_bytes(b"")
    urls = [str(data["root"] / f"lat-{i:02d}.tar") for i in range(N)] + [f"{tmp_path}/lat-09.tar"]
    r = cluster.run_script(
        "submit.sh", *ARGS, urls_override(urls), f"output.dir={out}", "ray.max_shard_retries=2",
        timeout=180,
    )  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"failed shard lat-09 ({tmp_path}/lat-09.tar)" in r.stdout  # the summary names it
    manifest = json.loads((out / "_manifest.json").read_text())
    bad = manifest["shards"]["lat-09"]
    assert bad["status"] == "failed" and bad["attempts"] == 3 and "lat-09.tar" in bad["error"]
    assert manifest["totals"]["ok"] == N and manifest["totals"]["failed"] == 1
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["shard"] for r in rejects] == ["lat-09"] and "3 attempt" in rejects[0]["reason"]
    assert_same_records(read_records(out), data["clean"])
    assert not (out / "lat-09.parquet").exists()


@pytest.mark.cluster
def test_worker_node_removed_mid_job_finishes_degraded(cluster, data, tmp_path):
    """The worker node vanishes (SIGKILL of its raylet, actors and all) while its actor is in
    the middle of a shard: the job finishes on the head's actor alone (the replacement actor
    cannot be placed: a degraded run, not a hang), output equal to a clean run."""
    out, gate = tmp_path / "out", tmp_path / "gate"
    job = cluster.popen_script(
        "submit.sh", *ARGS, urls_override(held(data, gate)), f"output.dir={out}"
    )
    worker = cluster.workers()[0]
    busy = wait_for(
        lambda: writing_actors(worker, out), 120, "the worker node's actor mid-shard", job
    )
    shard = next(iter(busy.values()))
    cluster.remove_node(worker)
    gate.touch()
    code, stdout, stderr = finish(job)
    assert code == 0, stdout + stderr
    assert "1 of 2 actors live" in stdout
    manifest = check_output(out, data)
    assert manifest["shards"][shard]["attempts"] == 2
    assert len({e["worker"]["pid"] for e in manifest["shards"].values()}) <= 2


def test_unwritable_output_dir_is_a_clear_error_before_ray(data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cfg = compose([*ARGS, f"source.urls={data['root']}/lat-00.tar", f"output.dir={blocker}/out"])
    with pytest.raises(JobError, match=rf"output.dir={blocker}/out is not writable"):
        run(cfg)


def test_failed_write_is_retried_named_and_leaves_no_partial_file(data, tmp_path):
    """One shard's file cannot be written (a directory is in its way): its attempts fail with an
    error naming the file, it is recorded as failed, the others commit, no temporary file stays."""
    out = tmp_path / "out"
    run(compose([*ARGS, f"source.urls={data['root']}/lat-00.tar", f"output.dir={out}"]))
    (out / "lat-01.parquet").mkdir()  # the pipeline writes only into a directory of its own
    urls = f"source.urls={data['root']}/lat-{{00..{N - 1:02d}}}.tar"
    m = run(compose([*ARGS, urls, f"output.dir={out}", "ray.max_shard_retries=1"]))
    assert m["exit_code"] == 1
    bad = m["shards"]["lat-01"]
    assert bad["status"] == "failed" and bad["attempts"] == 2
    assert f"OutputWriteError: cannot write {out}/lat-01.parquet" in bad["error"]
    assert m["totals"]["ok"] == N - 1
    left = sorted(os.listdir(out)) + sorted(os.listdir(out / "_shards"))
    assert not [n for n in left if ".tmp-" in n], left
    assert not (out / "_shards" / "lat-01.json").exists()
    assert not (out / "_shards" / "lat-01.rejects.jsonl").exists()
    got = read_records(out)
    assert_same_records(got, {k: v for k, v in data["clean"].items() if k != "lat-01.parquet"})
