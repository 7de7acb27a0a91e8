"""Run: the precompute job, from the Hydra config to the shard workers' chains of stages.

Driver: :mod:`.config` (schemas), :mod:`.config_rules` (allowed values), :mod:`.overrides` (the
command line), :mod:`.metadata` (what every file shares), :mod:`.jobstate` (the run's shards),
:mod:`.raysession` and :mod:`.reaper` (Ray, embedded or joined), :mod:`.pool` and
:mod:`.dispatch` (actors take shards). Actor: :mod:`.worker` (one shard at a time) runs the
chain of :mod:`.stages`, each a :class:`.stage.Stage`. The command is :mod:`pipeline.precompute`.
"""
