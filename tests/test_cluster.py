"""The precompute and the validation as Ray jobs on a real two-node Ray cluster on loopback
(``ray start --head`` + ``ray start --address``, token authentication on), submitted the way users
submit them: ``jobs/submit.sh`` and ``jobs/validate.sh`` to the head's job server. The cluster is
shared with test_faults.py and test_remote_storage.py (tests/raycluster.py). Also: the example
cluster definition against the installed Ray's schema, the runtime environment, token checks."""

from __future__ import annotations

import copy
import json
import os

import pytest
import yaml
from fixtures.dataset import JOB_ARGS
from fixtures.records import assert_same_records, read_records
from raycluster import ROOT, finish, gated, urls_override, wait_for, writing_actors

ARGS = JOB_ARGS


pytestmark = pytest.mark.usefixtures("cluster_release")  # conftest: the shared cluster's end


@pytest.fixture(scope="module")
def data(small_dataset):
    return small_dataset


@pytest.mark.cluster
def test_submit_runs_on_two_nodes_then_validate_gates(cluster, data, tmp_path):
    """submit.sh: a job on both nodes at once (every shard is held half-read until both nodes'
    actors are in the middle of one), the job's log followed, its exit code, the records equal
    to a clean run; then validate.sh passes, and fails once a commit marker is lost."""
    out, gate = tmp_path / "out", tmp_path / "gate"
    urls = [gated(f"{data['root']}/lat-{i:02d}.tar", gate) for i in range(4)]
    job = cluster.popen_script("submit.sh", *ARGS, urls_override(urls), f"output.dir={out}")
    head, worker = cluster.nodes[0], cluster.workers()[0]
    wait_for(
        lambda: writing_actors(head, out) and writing_actors(worker, out),
        120,
        "an actor on each node in the middle of a shard",
        job,
    )
    gate.touch()
    code, stdout, stderr = finish(job)
    assert code == 0, stdout + stderr
    assert "shards: 4 (4 ok, 0 partial, 0 failed)" in stdout  # the job's log, followed
    assert_same_records(read_records(out), data["clean"])
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["complete"] and manifest["config"]["ray"]["address"] == "auto"

    r = cluster.run_script("validate.sh", f"output.dir={out}", "plots=false", "progress=false")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASSED" in r.stdout
    # the gate closes: a shard lost its commit marker -> the validation fails (exit 1)
    (out / "_shards" / "lat-02.json").unlink()
    r = cluster.run_script("validate.sh", f"output.dir={out}", "plots=false", "progress=false")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED" in r.stdout and "lat-02" in r.stdout + r.stderr


@pytest.mark.cluster
def test_job_that_cannot_start_exits_2(cluster, tmp_path):
    urls = f"source.urls={tmp_path}/missing-{{0..1}}.tar"  # no sample to take the shape from
    r = cluster.run_script("submit.sh", "source=arrays", urls, f"output.dir={tmp_path}/out")
    assert r.returncode == 2, r.stdout + r.stderr  # the job's own exit code 2
    assert "missing-0.tar does not exist" in r.stdout + r.stderr


@pytest.mark.cluster
def test_token_authentication_stays_on(cluster, tmp_path):
    # a wrong token is refused by the cluster: the job is not submitted
    r = cluster.run_script("submit.sh", "seed=1", env={"RAY_AUTH_TOKEN": "0" * 64})
    assert r.returncode == 2 and "was not submitted" in r.stderr, r.stdout + r.stderr
    assert "403: Forbidden" in r.stderr or "401" in r.stderr, r.stderr
    # the scripts never turn authentication off, and say where the token is looked for
    r = cluster.run_script("submit.sh", "seed=1", env={"RAY_AUTH_MODE": "disabled"})
    assert r.returncode == 2 and "RAY_AUTH_MODE=token" in r.stderr
    no_token = {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "none"), "HOME": str(tmp_path)}
    r = cluster.run_script("validate.sh", "output.dir=x", env=no_token)
    assert r.returncode == 2 and "RAY_AUTH_TOKEN" in r.stderr
    r = cluster.run_script("submit.sh", env={"RAY_ADDRESS": ""})
    assert r.returncode == 2 and "RAY_ADDRESS" in r.stderr


def test_cluster_yaml_is_valid_for_ray_up():
    """jobs/cluster-aws.yaml against the installed Ray's cluster-launcher schema (what `ray up`
    checks first): a CPU head, GPU workers, token authentication on every node."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "jobs" / "cluster-aws.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))
    types = raw["available_node_types"]
    head, workers = types[raw["head_node_type"]], [v for k, v in types.items() if "worker" in k]
    assert head["node_config"]["InstanceType"].startswith("m5")  # CPU
    assert workers and all(w["node_config"]["InstanceType"].startswith("g5") for w in workers)
    assert any(p.endswith(".ray/auth_token") for p in raw["file_mounts"])
    for cmd in raw["head_start_ray_commands"][1:] + raw["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token ray start" in cmd
    typo = copy.deepcopy(raw)
    typo["available_node_types"]["ray.worker.gpu"]["min_worker"] = 1
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(typo))


def test_runtime_env_is_valid():
    from ray.runtime_env import RuntimeEnv

    spec = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    env = RuntimeEnv(**spec)
    assert env["working_dir"] == "." and ".venv/" in env["excludes"]
    assert all(isinstance(v, str) for v in env["env_vars"].values())


def test_scripts_are_executable():
    for name in ("submit.sh", "validate.sh"):
        assert os.access(ROOT / "jobs" / name, os.X_OK), name
