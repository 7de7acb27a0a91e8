"""Encode: frozen models on the actor's device, identified by the exact bytes they load.

:mod:`.modelfiles` (model folders and their identity) and :mod:`.weights` (safetensors loaded from
the bytes hashed); :mod:`.encoder` (the VAE, identified on the driver) and :mod:`.encode_stage`
(its stage on the actor); :mod:`.text` (the text encoders' presets and identity) and
:mod:`.text_encode` (their stage); :mod:`.device` (the GPU Ray assigned) and :mod:`.memory`
(batch sizes that fit).
"""
