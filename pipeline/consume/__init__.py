"""Consume: what trainers read, the committed records of an output directory.

:mod:`.recordsdir` (committed files and their footers) -> :mod:`.partition` (the units each rank
and DataLoader worker reads, the draws an epoch keeps, ``len()``) and :mod:`.columns` (the
columns asked for, the text-embedding join) -> :mod:`.batching` (records to tensors and batches)
-> :mod:`.dataset` (:class:`~.dataset.PrecomputedDataset`, a PyTorch IterableDataset), with
:mod:`.labels` (null labels) and :mod:`.hf` (Hugging Face ``datasets``).
"""
