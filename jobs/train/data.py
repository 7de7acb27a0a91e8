"""What the example trainer reads: the DataLoader over
:class:`pipeline.consume.dataset.PrecomputedDataset`, the held-out split by key
(:func:`is_held_out`, :class:`KeySplit`), the label counts read with pyarrow before training
(:func:`scan_records`) and the checks of ``--cond``'s column (:func:`check_label_column`,
:func:`text_column`)."""

from __future__ import annotations

import zlib

import numpy as np
from torch.utils.data import DataLoader, IterableDataset

from pipeline.consume.dataset import PrecomputedDataset, RecordsDir


def loader(ds, batch_size: int, workers: int, drop_last: bool = True) -> DataLoader:
    """A DataLoader of ``ds`` in batches of ``batch_size`` with ``workers`` worker processes."""
    return DataLoader(ds, batch_size=batch_size, num_workers=workers, drop_last=drop_last)


def is_held_out(key: str, fraction: float) -> bool:
    """Whether the sample ``key`` is in the held-out ``fraction`` (a stable hash of the key, so
    every draw of a sample and every run agree)."""
    return zlib.crc32(key.encode("utf-8")) % 100_000 < fraction * 100_000


class KeySplit(IterableDataset):
    """The records of ``ds`` (which must read ``key``) on one side of the held-out split."""

    def __init__(self, ds: PrecomputedDataset, fraction: float, held_out: bool):
        super().__init__()
        self.ds, self.fraction, self.held_out = ds, fraction, held_out

    def __iter__(self):
        for record in self.ds:
            if is_held_out(record["key"], self.fraction) == self.held_out:
                yield record


def scan_records(rdir: RecordsDir, label: str | None, holdout: float) -> dict:
    """Counts read with pyarrow before training (the ``key`` and ``label`` columns only):
    ``held_out`` records and, with ``label``, ``null_labels`` (null or -1), the largest label
    ``max_label`` (None when every label is null) and ``class_counts`` {label: records}.
    ValueError for a label below -1."""
    columns = ([label] if label else []) + (["key"] if holdout else [])
    out = {"records": rdir.num_records, "held_out": 0}
    values = []
    for unit in rdir.units() if columns else ():
        table = rdir.read(unit, columns)
        if holdout:
            keys = table["key"].to_pylist()
            out["held_out"] += sum(is_held_out(k, holdout) for k in keys)
        if label:
            values.append(table[label].fill_null(-1).to_numpy())
    if label:
        y = np.concatenate(values) if values else np.zeros(0, np.int64)
        if (y < -1).any():
            raise ValueError(
                f"column {label!r} holds negative labels (smallest {int(y.min())}): class "
                "labels must be 0..num_classes-1 (a null or -1 trains as the null label)"
            )
        classes, counts = np.unique(y[y >= 0], return_counts=True)
        out["null_labels"] = int((y < 0).sum())
        out["max_label"] = int(classes[-1]) if len(classes) else None
        out["class_counts"] = {int(c): int(n) for c, n in zip(classes, counts)}
    return out


def check_label_column(rdir: RecordsDir, column: str) -> None:
    """ValueError unless ``column`` is an int64 conditioning column of the records (listed in
    the metadata's ``conditioning`` entry, :mod:`pipeline.read.conditioning`)."""
    from pipeline.read.conditioning import Conditioning

    kept = {k.column: k for k in Conditioning.from_spec(rdir.description.conditioning).kept}
    ints = [c for c, k in kept.items() if k.type == "int64"]
    hint = f"int64 conditioning columns of these records: {', '.join(ints) or 'none'}"
    if column not in kept:
        raise ValueError(
            f"--cond {column}: the records in {rdir.uri} have no conditioning column {column!r} "
            f"(kept: {', '.join(kept) or 'none'}; see source.keep); {hint}"
        )
    if kept[column].type != "int64":
        raise ValueError(
            f"--cond {column}: {column!r} is a {kept[column].type} column; this example "
            f"conditions on integer class labels; {hint}"
        )


def text_column(rdir: RecordsDir) -> str:
    """The caption embedding ``--cond text`` conditions on: the pooled column of the first text
    encoder that stores one (``clip_pooled``, ``clip_g_pooled`` for sdxl, ``clip_l_pooled`` for
    sd3 and flux); ValueError naming the fix for records without one."""
    from pipeline.encode.text import column_names

    meta = rdir.description.text
    if not meta:
        raise ValueError(
            f"--cond text: the records in {rdir.uri} have no text embeddings (made without "
            "text=...): precompute them with text=clip text.model=<folder> (or sdxl, sd3, flux)"
        )
    pooled = [column_names(e)["pooled"] for e in meta["encoders"] if "pooled" in e["output"]]
    if not pooled:
        names = ", ".join(e["name"] for e in meta["encoders"])
        raise ValueError(
            f"--cond text: the text encoders of {rdir.uri} ({names}) store no pooled embedding; "
            "this example conditions on one: text=clip, sdxl, sd3 or flux"
        )
    return pooled[0]
