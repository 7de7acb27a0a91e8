"""How many samples fit in memory: the batch-size arithmetic of the shard worker, its VAE stage
and the driver's check that one sample fits in an actor (no torch: the driver imports it).

:func:`working_set_per_sample` estimates the bytes one sample's records take while a batch is
computed (:data:`DEVICE_BYTES_PER_ELEMENT` per element and draw); :func:`fit_batch_size` caps a
batch size to a share of the free bytes (a GPU's free memory, or :func:`host_memory_share`, an
actor's share of the node's RAM), or raises MemoryError naming the keys to change.
"""

from __future__ import annotations

import os

import numpy as np

# Device bytes per sample element and draw while a batch is computed: float32 x_0, eps, x_t and
# the posterior's temporaries, plus the output casts (a deliberate overestimate).
DEVICE_BYTES_PER_ELEMENT = 8 * 4


def fit_batch_size(
    requested: int, bytes_per_sample: int, free_bytes: int, fraction=0.5, where="GPU"
) -> int:
    """The batch size to use: ``requested``, capped so that the batch's working set
    (``bytes_per_sample`` each) fits in ``fraction`` of ``free_bytes`` of ``where``'s memory
    (the GPU's free memory, or the host's share of an actor). MemoryError when one sample does
    not fit, naming the keys that set its size."""
    fits = int(free_bytes * fraction) // max(1, bytes_per_sample)
    if fits < 1:
        fix = (
            "free the GPU or use ray.device=cpu"
            if where == "GPU"
            else (
                "use a smaller source.resolution (or arrays), fewer sampling.draws_per_sample, or "
                "more memory per actor (ray.cpus_per_actor, on nodes with more RAM)"
            )
        )
        raise MemoryError(
            f"one sample needs ~{bytes_per_sample / 2**20:.1f} MiB of {where} memory while "
            f"{fraction:.0%} of {free_bytes / 2**20:.1f} MiB is available to it: {fix}"
        )
    return min(requested, fits)


def host_memory_share(cpus_per_actor: float) -> int:
    """This node's physical memory in bytes, times the share of its CPUs one actor reserves
    (the default pool runs one actor per CPU)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * min(1.0, cpus_per_actor / max(1, os.cpu_count() or 1)))


def working_set_per_sample(shape, draws: int) -> int:
    """Bytes one sample's K records take while a batch is computed (an overestimate)."""
    return draws * int(np.prod(shape)) * DEVICE_BYTES_PER_ELEMENT
