"""What a user launches: jobs/submit.sh and jobs/validate.sh (Ray jobs), the cluster and runtime
environment yaml, the example trainer, and the benchmark (``python -m jobs.bench``).

A package only so that the modules of the benchmark (``jobs.bench.*``) and of the example
trainer (``jobs.train.*``) import each other when run with ``python -m`` from the repository
root; it is not installed (pyproject packages only ``pipeline``).
"""
