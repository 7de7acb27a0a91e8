"""The benchmark: the precompute against its floor and its Ray Data peer (``make bench``).

Run from the repository root: ``python -m jobs.bench [--quick] [--help]``. Modules (each also
runs alone with ``python -m jobs.bench.<module>``):

* :mod:`~jobs.bench.run`: the harness (scenarios, runs, results; method in its docstring);
* :mod:`~jobs.bench.floor`: the floor, the work in plain numpy/pyarrow;
* :mod:`~jobs.bench.peer`: the peer, the work as a Ray Data pipeline;
* :mod:`~jobs.bench.measure`: whole-process measurement and the input shards;
* :mod:`~jobs.bench.profile`: py-spy profile of one shard, by stage;
* :mod:`~jobs.bench.startup`: the project's fixed cost per job, by phase;
* :mod:`~jobs.bench.parquet`: what Parquet encoding of the tensor columns costs;
* :mod:`~jobs.bench.report`: tables, plot and Markdown from saved results;
* :mod:`~jobs.bench.encoder`: the VAE encoder job, decode vs encode;
* :mod:`~jobs.bench.validation`: validation's wall time against the precompute's;
* :mod:`~jobs.bench.loader`: the training loader against a plain pyarrow read;
* :mod:`~jobs.bench.scale`: the driver's own work at 1k-100k shards (simulated);
* :mod:`~jobs.bench.noisehash`: the duplicate-noise check's memory as records grow.

``make bench`` runs the harness and then each of the last four.

Saved results of full runs are in ``jobs/bench/results/``; the report is ``docs/benchmark.md``.
"""
