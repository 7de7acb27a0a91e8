"""What a user launches: jobs/submit.sh and jobs/validate.sh (Ray jobs), the cluster and runtime
environment yaml, the example trainer, and the benchmark (``python -m jobs.bench``).

A package only so that the benchmark's modules import each other (``jobs.bench.*``) when run
with ``python -m`` from the repository root; it is not installed (pyproject packages only
``pipeline``).
"""
