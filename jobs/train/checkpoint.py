"""The example trainer's checkpoint: the weights as safetensors (never a pickle) with what rebuilds
the model in the file's metadata (:func:`save_checkpoint`, :func:`load_checkpoint`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from pipeline.output.description import ProcessMetadata

from .model import TinyDenoiser


def save_checkpoint(
    model: TinyDenoiser, path: Path, description: ProcessMetadata | Mapping
) -> None:
    """The model's weights as safetensors (never a pickle), with what rebuilds it (shape, width,
    classes) and the records' schedule in the file's metadata; see :func:`load_checkpoint`.
    ``description``: the records' process description (``PrecomputedDataset.description``, or
    its JSON dict ``.metadata``)."""
    from safetensors.torch import save_file

    description = ProcessMetadata.from_json(description)
    config = {
        "shape": list(description.shape),
        "num_timesteps": model.num_timesteps,
        "width": model.inp.conv.out_channels,
        "emb": model.emb_dim,
        "num_classes": model.num_classes,
        "text_dim": model.text_dim,
        "schedule": description.schedule,
    }
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"config": json.dumps(config)})


def load_checkpoint(path) -> tuple[TinyDenoiser, dict]:
    """(model in eval mode, its config) from a file written by :func:`save_checkpoint`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
    model = TinyDenoiser(
        config["shape"], config["num_timesteps"], width=config["width"], emb=config["emb"],
        num_classes=config["num_classes"], text_dim=config.get("text_dim", 0),
    )  # fmt: skip
    model.load_state_dict(load_file(str(path)))
    return model.eval(), config
