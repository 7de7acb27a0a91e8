#!/usr/bin/env bash
# Validate a precomputed dataset as a Ray job on the cluster, and gate on the verdict:
#
#   RAY_ADDRESS=http://127.0.0.1:8265 jobs/validate.sh output.dir=s3://b/noised
#   jobs/submit.sh output.dir=... source.urls=... && jobs/validate.sh output.dir=...
#
# Submits `python -m pipeline.validate ray.address=auto <hydra overrides...>` exactly as
# jobs/submit.sh submits the precompute (same runtime environment, token authentication and
# environment variables; see there) and exits with the validator's exit code (pipeline/errors.py;
# `python -m pipeline.errors` lists them): 0 every check passed, 1 a check failed, 2 the
# validation could not run (no such dataset, bad key, or the job could not be submitted), 70 a
# bug; 128+N when its driver was killed by signal N, 3 when it was stopped, 130 interrupted.
set -euo pipefail
JOB_MODULE=pipeline.validate exec "$(dirname "${BASH_SOURCE[0]}")/submit.sh" "$@"
