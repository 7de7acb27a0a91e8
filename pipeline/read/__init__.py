"""Read: untrusted WebDataset shards in, one validated sample at a time out.

:mod:`.tarheader` (bounded tar headers) -> :mod:`.tarstream` (one shard's members) ->
:mod:`.decoders` (bytes -> float32 arrays) -> :mod:`.source` (a shard's samples, their keys and
rejects), with :mod:`.conditioning` (labels, captions, metadata kept), :mod:`.buckets` (the
aspect-ratio grid, crop and flip) and :mod:`.prefetch` (read-ahead in a thread).
"""
