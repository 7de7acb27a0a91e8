"""Consume: what trainers read, the committed records of an output directory.

:mod:`.recordsdir` (committed files and their footers) -> :mod:`.batching` (records to tensors
and batches) -> :mod:`.dataset` (:class:`~.dataset.PrecomputedDataset`, a PyTorch
IterableDataset), with :mod:`.labels` (null labels) and :mod:`.hf` (Hugging Face ``datasets``).
"""
