"""Output: the record format and the output directory, the commit point of every shard.

:mod:`.records` (the column registry, the one home of the record format) and
:mod:`.description` (the process described in each file's metadata); :mod:`.contracts` (the typed
ShardResult and CommitMarker) and :mod:`.commit` (files renamed into place, then the marker);
:mod:`.manifest` (the directory's layout) and :mod:`.text_store` (text embeddings per shard);
:mod:`.lease`, :mod:`.prepare` and :mod:`.resume` (one driver at a time; refuse, clear or resume).
"""
