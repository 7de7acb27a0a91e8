"""Shards read from and records written to object storage: ``s3://`` URLs against a local
S3-compatible server (moto's server mode, started here on a free loopback port), selected the
standard way (``AWS_ENDPOINT_URL``, honoured by pyarrow for the records and for the shards,
which pipeline.read.tarstream opens with pipeline.fs.open_input). The job runs on the loopback
cluster through jobs/submit.sh with a runtime environment carrying the endpoint, its driver is
SIGKILLed in the middle and the same command resumes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml
from fixtures.dataset import JOB_ARGS
from fixtures.records import assert_same_records, read_records
from raycluster import ROOT, finish, gated, shared_cluster, urls_override, wait_for

from pipeline.output.manifest import OutputDir

boto3 = pytest.importorskip("boto3", reason="remote storage tests need moto[server] and s3fs")
pytest.importorskip("moto", reason="remote storage tests need moto[server]")
pytest.importorskip("s3fs", reason="remote storage tests need s3fs")

ARGS = JOB_ARGS
BUCKET = "ddpm"


pytestmark = pytest.mark.usefixtures("cluster_release")  # conftest: the shared cluster's end


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1:<free port>; yields the AWS_* environment that selects it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start: {log.read_text()}") from None
                time.sleep(0.2)
        client = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=BUCKET)
        yield {"env": env, "client": client}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def aws_env(s3, monkeypatch):
    """This process talks to the moto server too (to put shards and read records)."""
    for k, v in s3["env"].items():
        monkeypatch.setenv(k, v)
    return s3["env"]


def objects(client, prefix: str) -> dict[str, str]:
    """key (relative to prefix) -> ETag of every object under prefix."""
    res = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"][len(prefix) :]: o["ETag"] for o in res.get("Contents", [])}


def test_object_store_writes_in_place(aws_env):
    """On S3 an upload is atomic and a rename is a copy: files go straight to their name."""
    out = OutputDir(f"s3://{BUCKET}/unit")
    assert out.atomic_writes and out.tmp_name("a.json") == "a.json"
    out.write_json("_shards/a.json", {"x": 1})
    assert out.read_json("_shards/a.json") == {"x": 1} and out.list("_shards") == ["_shards/a.json"]
    assert not OutputDir("/tmp/x").atomic_writes


@pytest.mark.cluster
def test_s3_job_killed_then_resumed_equals_clean_run(request, s3, aws_env, small_dataset, tmp_path):
    cluster = shared_cluster(request, workers=0)  # one node is enough here
    data = small_dataset
    for p in sorted(data["root"].glob("lat-*.tar")):
        s3["client"].upload_file(str(p), BUCKET, f"shards/{p.name}")
    clean = data["clean"]

    # the job's runtime environment: jobs/runtime_env.yaml plus the storage endpoint
    spec = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    spec["env_vars"].update(s3["env"])
    runtime_env = tmp_path / "runtime_env.yaml"
    runtime_env.write_text(yaml.safe_dump(spec))
    env = {"RUNTIME_ENV": str(runtime_env)}
    gate = tmp_path / "gate"
    urls = [f"s3://{BUCKET}/shards/lat-0{i}.tar" for i in (0, 1)] + [
        gated(f"s3://{BUCKET}/shards/lat-0{i}.tar", gate) for i in (2, 3)
    ]  # lat-02 and lat-03 are held in the middle until the gate opens
    out = f"s3://{BUCKET}/out"
    args = [*ARGS, urls_override(urls), f"output.dir={out}", "ray.num_actors=1"]

    job = cluster.popen_script("submit.sh", *args, env=env)
    markers = ("out/_shards/lat-00.json", "out/_shards/lat-01.json")
    wait_for(
        lambda: set(markers) <= {f"out/{k}" for k in objects(s3["client"], "out/")},
        120,
        "lat-00 and lat-01 committed on S3",
        job,
    )
    (driver,) = cluster.nodes[0].find(lambda argv: "pipeline.precompute" in argv[1:3])
    os.kill(driver, signal.SIGKILL)
    code, stdout, stderr = finish(job)
    assert code == 137, stdout + stderr
    before = objects(s3["client"], "out/")

    gate.touch()
    r = cluster.run_script("submit.sh", *args, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 shards, 2 already committed, 2 to do" in r.stdout
    assert_same_records(read_records(out), clean)
    after = objects(s3["client"], "out/")
    for key in ("lat-00.parquet", "lat-01.parquet", "_shards/lat-00.json"):
        assert after[key] == before[key], key  # committed before the kill: untouched
    expected = {f"lat-0{i}.parquet" for i in range(4)} | {"_manifest.json", "rejects.jsonl"}
    expected |= {f"_shards/lat-0{i}.{ext}" for i in range(4) for ext in ("json", "rejects.jsonl")}
    assert set(after) - {"_shards/", ""} == expected  # nothing temporary, partial or duplicate
    manifest = json.loads(
        s3["client"].get_object(Bucket=BUCKET, Key="out/_manifest.json")["Body"].read()
    )
    assert manifest["complete"] and manifest["totals"]["ok"] == 4
    assert manifest["shards"]["lat-00"]["url"] == f"s3://{BUCKET}/shards/lat-00.tar"
