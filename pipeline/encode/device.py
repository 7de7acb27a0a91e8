"""The device an actor computes on, and copies between it and the host.

Ray assigns each actor its GPUs (``ray.gpus_per_actor``) and sets ``CUDA_VISIBLE_DEVICES`` to
their ids, so the first assigned GPU is ``cuda:0`` inside the actor. Every stage of a worker gets
the one device chosen here (:func:`actor_device`) in its ``setup``; none picks its own.

torch is imported inside the functions: the driver imports the worker module (to start actors)
without loading torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cuda", "cpu")  # ray.device


def resolve_device(requested: str, gpu_ids: Sequence, cuda_available: bool) -> torch.device:
    """The torch device for an actor, from the GPU ids Ray assigned it.

    ``requested`` is ``ray.device``: auto | cuda | cpu. ``cuda`` without an assigned GPU or
    without CUDA in torch is a RuntimeError naming the config keys to change.
    """
    import torch

    if requested == "cpu":
        return torch.device("cpu")
    if gpu_ids and cuda_available:
        return torch.device("cuda", 0)
    if requested == "cuda":
        why = "Ray assigned this actor no GPU" if not gpu_ids else "torch sees no CUDA device"
        raise RuntimeError(
            f"ray.device=cuda but {why} (assigned GPU ids: {list(gpu_ids)}); set "
            "ray.gpus_per_actor=1 on a node with GPUs and a CUDA build of torch, or use "
            "ray.device=auto|cpu"
        )
    return torch.device("cpu")


def assigned_gpus() -> list:
    """GPU ids Ray assigned to the current worker ([] outside Ray or without GPUs)."""
    import ray

    if not ray.is_initialized():
        return []
    return list(ray.get_runtime_context().get_accelerator_ids().get("GPU", []))


def actor_device(requested: str) -> tuple[torch.device, list]:
    """(device, Ray-assigned GPU ids) of the calling actor for ``ray.device=requested``."""
    import torch

    gpu_ids = assigned_gpus()
    return resolve_device(requested, gpu_ids, torch.cuda.is_available()), gpu_ids


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``: on CUDA copied from pinned memory, without blocking."""
    if device.type != "cuda":
        return x
    return x.pin_memory().to(device, non_blocking=True)


def to_host(x: torch.Tensor) -> torch.Tensor:
    """A device tensor in (pinned) host memory; from CUDA the copy is asynchronous: call
    :func:`synchronize` before reading it."""
    if x.device.type != "cuda":
        return x
    import torch

    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    return host.copy_(x, non_blocking=True)


def synchronize(device: torch.device) -> None:
    """Wait for the device's current stream (the host copies of :func:`to_host` are complete)."""
    if device.type == "cuda":
        import torch

        torch.cuda.current_stream(device).synchronize()
