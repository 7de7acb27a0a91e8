#!/usr/bin/env bash
# Run the precompute as a Ray job on a cluster:
#
#   RAY_ADDRESS=http://127.0.0.1:8265 jobs/submit.sh ray=cluster source=arrays \
#       source.urls='s3://bucket/lat-{000000..000099}.tar' output.dir=s3://bucket/noised
#
# Submits `python -m pipeline.precompute ray.address=auto <hydra overrides...>` with
# `ray job submit` to the job server at $RAY_ADDRESS (the dashboard's http address; through
# `ray dashboard cluster.yaml` it is http://127.0.0.1:8265), with the runtime environment
# jobs/runtime_env.yaml (or $RUNTIME_ENV), follows the job's log and exits with the job's own
# exit code. Re-running the same command resumes: committed shards are skipped.
#
# Token authentication stays on: RAY_AUTH_MODE=token is set (any other mode is refused) and the
# token is found where Ray looks for it: $RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH,
# else ~/.ray/auth_token (`ray get-auth-token` prints it).
#
# Environment: RAY_ADDRESS (required), RUNTIME_ENV (runtime env YAML), SUBMISSION_ID (default
# ddpm-<module>-<UTC time>-<random>), RAY (the ray CLI, default `ray`). Needs python3.
#
# Exit codes (pipeline/errors.py; `python -m pipeline.errors` lists them): the job's own (0 done,
# 1 failed, 2 could not start, 70 a bug); this script also exits 2 when the job cannot be
# submitted or started (no RAY_ADDRESS or token, cluster unreachable, token refused, runtime
# environment failed), 128+N when the job's driver was killed by signal N (re-run to resume),
# 3 when the job was stopped (`ray job stop`), and 130 when this script is interrupted (the job
# goes on: `ray job logs -f <id>`, `ray job stop <id>`).
set -euo pipefail

# The exit codes of pipeline/errors.py (ExitCode); tests/test_errors.py checks that they agree.
EXIT_OK=0
EXIT_CANNOT_START=2
EXIT_STOPPED=3
EXIT_SIGNALLED=128
EXIT_INTERRUPTED=130

JOB_MODULE="${JOB_MODULE:-pipeline.precompute}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
runtime_env="${RUNTIME_ENV:-$root/jobs/runtime_env.yaml}"
ray_cli="${RAY:-ray}"

fail() {
    echo "error: $*" >&2
    exit "$EXIT_CANNOT_START"
}

[[ -n "${RAY_ADDRESS:-}" ]] || fail "RAY_ADDRESS is not set: export RAY_ADDRESS=http://<head>:8265 (the Ray job server; \`ray dashboard cluster.yaml\` forwards it to http://127.0.0.1:8265)"
[[ -f "$runtime_env" ]] || fail "runtime environment $runtime_env: no such file"
command -v "$ray_cli" >/dev/null || fail "the ray CLI ($ray_cli) is not on PATH: pip install 'ray[default]'"

# Token authentication: on, never off. Ray reads the token itself; check that there is one.
if [[ "${RAY_AUTH_MODE:-token}" != token ]]; then
    fail "RAY_AUTH_MODE=$RAY_AUTH_MODE: these scripts only talk to clusters with token authentication (RAY_AUTH_MODE=token)"
fi
export RAY_AUTH_MODE=token
if [[ -z "${RAY_AUTH_TOKEN:-}" ]]; then
    token_file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
    [[ -s "$token_file" ]] || fail "no Ray auth token: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a token file, or put the cluster's token in ~/.ray/auth_token (\`ray get-auth-token\` prints it)"
fi

# `ray job submit` quotes each argument of the entrypoint for the job's shell (shlex.join).
entrypoint=(python -m "$JOB_MODULE" ray.address=auto "$@")

name="${JOB_MODULE##*.}"
id="${SUBMISSION_ID:-ddpm-$name-$(date -u +%Y%m%d-%H%M%S)-$RANDOM$RANDOM}"
echo "submitting $id to $RAY_ADDRESS: ${entrypoint[*]}" >&2
trap 'echo "interrupted: job $id keeps running on the cluster (ray job logs -f $id; ray job stop $id)" >&2; exit "$EXIT_INTERRUPTED"' INT

cd "$root" # the runtime env's working_dir "." is the repository root
set +e
"$ray_cli" job submit --address "$RAY_ADDRESS" --submission-id "$id" \
    --runtime-env "$runtime_env" -- "${entrypoint[@]}"
submit_rc=$?
set -e

# The job's own exit code, from the job server's REST API (`ray job submit` only tells
# succeeded from failed), with the token taken from where Ray takes it.
code="$(
    python3 - "$RAY_ADDRESS" "$id" "$EXIT_OK" "$EXIT_STOPPED" "$EXIT_SIGNALLED" \
        "$EXIT_CANNOT_START" <<'PY'
import json
import os
import sys
import urllib.request

address, job = sys.argv[1:3]
ok, stopped, signalled, cannot_start = map(int, sys.argv[3:7])
address = address if "://" in address else f"http://{address}"
token = os.environ.get("RAY_AUTH_TOKEN") or ""
if not token:
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    with open(path) as fh:
        token = fh.read().strip()
request = urllib.request.Request(
    f"{address.rstrip('/')}/api/jobs/{job}", headers={"Authorization": f"Bearer {token}"}
)
try:
    with urllib.request.urlopen(request, timeout=60) as response:
        info = json.load(response)
except Exception as exc:  # no such job: the submission itself failed
    print(f"cannot read job {job}: {exc}", file=sys.stderr)
    sys.exit(0)
rc, status = info.get("driver_exit_code"), info.get("status")
if status == "STOPPED":  # `ray job stop`: its driver got SIGTERM
    print(stopped)
elif rc is not None:
    print(signalled - rc if rc < 0 else rc)  # negative: killed by signal -rc
elif status == "SUCCEEDED":
    print(ok)
else:  # failed before its driver ran: runtime env, entrypoint not found, ...
    print(f"job {job} {status}: {info.get('message')}", file=sys.stderr)
    print(cannot_start)
PY
)" || code=""
if [[ -z "$code" ]]; then
    echo "error: job $id was not submitted (ray job submit exited $submit_rc)" >&2
    exit "$EXIT_CANNOT_START"
fi
echo "job $id exited with code $code" >&2
exit "$code"
