"""The text stage on the actor: tokenizers and frozen text encoders, loaded once from exactly the
bytes the driver hashed, turn each sample's caption into its embedding columns.

For every encoder of the metadata's ``text`` entry (see :mod:`pipeline.encode.text`): the tokenizer
files and the model's config and safetensors weights are read into memory once and verified
against their sha256 (:func:`pipeline.encode.weights.read_verified`, :func:`pipeline.encode.weights.
load_state_dict`: a file replaced under a running job cannot reach the embeddings); the model runs
in ``eval`` mode without gradients on the actor's device (the GPU Ray assigned it, else the CPU).

Tokenisation is the diffusers pipelines': ``padding="max_length"``, ``max_length``,
``truncation=True``; the model gets the attention mask only where ``attention_mask`` is set (the
SDXL, SD3 and Flux pipelines pass none, so padded positions matter and are kept). Each forward
pass has exactly ``text.batch_size`` captions (the last chunk padded with empty prompts), so a
caption's embedding depends neither on its neighbours nor on the number of actors: the same
caption gives the same bytes in every shard on one device and build. Every input is padded to
``max_length``, as the pipelines do: without the attention mask the padded positions are part of
the embedding. An encoder given the mask may set ``length_bucket``: its captions are then grouped
by their token count rounded up to a multiple of it and padded to that length only (few padded
positions computed: T5 at 256 tokens with captions of ~30 runs ~8x fewer positions), and the
positions beyond it are stored as zeros (masked).

Identical captions of a shard are encoded once (a per-shard cache, bounded in bytes). A sample
without a caption takes the empty prompt's embedding and ``caption_null = True``; a non-finite
embedding (float16 overflow) rejects its sample with the reason.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from pipeline.encode.text import TextError, _hub, column_names
from pipeline.encode.weights import WeightsError, load_state_dict, read_verified
from pipeline.run.stage import Batch, Stage

log = logging.getLogger(__name__)
CACHE_BYTES = 1 << 30  # embeddings of distinct captions kept per shard


def _folders(meta: Mapping) -> tuple[str, str]:
    """(model folder, tokenizer folder) of one encoder on this node."""
    if meta["location"] == "hub":
        rev = meta["resolved_revision"]
        model = _hub(meta["model"], rev, meta["subfolder"], meta["name"]).folder
        tok = _hub(meta["model"], rev, meta["tokenizer_subfolder"], meta["name"]).folder
        return model, tok
    for folder in (meta["folder"], meta["tokenizer_folder"]):
        if not os.path.isdir(folder):
            raise TextError(
                f"text encoder folder {folder} does not exist on node {socket.gethostname()}: "
                "put the model where every node sees it (a shared filesystem or a Hub id)"
            )
    return meta["folder"], meta["tokenizer_folder"]


def load_tokenizer(folder: str, files: Mapping[str, str]):
    """The tokenizer of ``folder`` from exactly its hashed files (copied, verified, into a private
    temporary folder that transformers reads)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="text-tokenizer-") as tmp:
        for name, sha in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(read_verified(os.path.join(folder, name), sha))
        return AutoTokenizer.from_pretrained(tmp)


def _no_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def load_model(folder: str, meta: Mapping, dtype: str, device):
    """The text encoder of ``folder`` built from exactly the hashed config and weights."""
    import json

    import torch
    import transformers

    config = json.loads(read_verified(os.path.join(folder, "config.json"), meta["config_sha256"]))
    cls = getattr(transformers, meta["class"].split(".", 1)[1])
    state = load_state_dict(folder, meta["weights_sha256"])
    with _no_init():
        model = cls(cls.config_class.from_dict(config))
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    loaded = {p.data_ptr() for k, p in model.state_dict().items() if k in state}
    params = dict(model.named_parameters())
    untied = [k for k in missing if k in params and params[k].data_ptr() not in loaded]
    if unexpected or untied:
        raise TextError(
            f"{folder}: the weights do not fit {meta['class']} (missing {untied[:3]}, unexpected "
            f"{list(unexpected)[:3]}): the folder holds another model"
        )
    del state
    model.eval().requires_grad_(False)
    return model.to(device=device, dtype=getattr(torch, dtype))


class TextEncoder:
    """One tokenizer + text encoder (``meta``: one entry of the metadata's ``text.encoders``)."""

    def __init__(self, meta: Mapping, *, compute_dtype: str, store_dtype: str, device):
        self.meta, self.device = meta, device
        self.store_dtype = store_dtype
        self.max_length = int(meta["max_length"])
        self.bucket = int(meta.get("length_bucket", 0))
        self.positions = 0  # token positions computed (rows x padded length of every pass)
        self.outputs = list(meta["output"])
        self.columns = column_names(meta)
        model_dir, tok_dir = _folders(meta)
        try:
            self.tokenizer = load_tokenizer(tok_dir, meta["tokenizer_sha256"])
            self.model = load_model(model_dir, meta, compute_dtype, device)
        except WeightsError as exc:
            raise TextError(f"on node {socket.gethostname()}: {exc}") from None

    def token_counts(self, captions: Sequence[str]) -> np.ndarray:
        """Tokens of each caption before truncation (special tokens included)."""
        ids = self.tokenizer(list(captions), truncation=False, verbose=False)["input_ids"]
        return np.array([len(i) for i in ids], dtype=np.int32)

    def batches(self, captions: Sequence[str], size: int):
        """(chunk of at most ``size`` captions, padded length) of the forward passes for
        ``captions``: in order, all padded to ``max_length``; with ``length_bucket`` the
        captions are grouped by their own padded length (token count rounded up to a multiple
        of it, at most ``max_length``), so a pass computes few padded positions and a caption's
        pass shape depends on its own length only (its bytes do not depend on its neighbours)."""
        if not self.bucket:
            for lo in range(0, len(captions), size):
                yield list(captions[lo : lo + size]), self.max_length
            return
        counts = self.token_counts(captions)
        lengths = np.minimum(-(-counts // self.bucket) * self.bucket, self.max_length)
        for length in sorted(set(lengths.tolist())):
            group = [c for c, n in zip(captions, lengths) if n == length]
            for lo in range(0, len(group), size):
                yield group[lo : lo + size], int(length)

    def encode(self, captions: Sequence[str], length: int | None = None) -> dict[str, np.ndarray]:
        """This encoder's columns for ``captions`` (one forward pass, as given), padded to
        ``length`` tokens (default ``max_length``); a shorter pass (``length_bucket``, with the
        attention mask) stores zeros at the positions beyond it, which the mask marks padding."""
        import torch

        length = length or self.max_length
        tok = self.tokenizer(
            list(captions), padding="max_length", max_length=length,
            truncation=True, return_tensors="pt",
        )  # fmt: skip
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"]
        kwargs = {"attention_mask": mask.to(self.device)} if self.meta["attention_mask"] else {}
        with torch.inference_mode():
            out = self.model(ids, output_hidden_states="penultimate" in self.outputs, **kwargs)
        self.positions += ids.numel()
        store = getattr(torch, self.store_dtype)
        pad = self.max_length - length

        def full(x):  # [B, length, ...] -> [B, max_length, ...], zeros beyond ``length``
            return torch.nn.functional.pad(x, (0, 0) * (x.ndim - 2) + (0, pad)) if pad else x

        cols = {self.columns["mask"]: full(mask.to(torch.int8)).numpy()}
        for o in self.outputs:
            if o == "last":
                value = full(out.last_hidden_state)
            elif o == "penultimate":
                value = full(out.hidden_states[-2])
            else:  # pooled: the projection's text_embeds, or CLIP's pooler_output
                value = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
            cols[self.columns[o]] = value.to(store).cpu().numpy()
        return cols


class TextStage(Stage):
    """The text encoders of a job on one actor (loaded at :meth:`setup`): per batch, each
    sample's embedding columns (:meth:`process`, :meth:`embed`).

    ``meta``: the metadata's ``text`` entry. Per shard (:meth:`start`) a cache holds the columns
    of the captions seen, and counts (captions, distinct, null, truncated per encoder) feed the
    shard's summary (:meth:`stats`, added to the shard's result by :meth:`finish`)."""

    def __init__(self, meta: Mapping, *, on_error: str = "skip"):
        self.meta, self.on_error = meta, on_error
        self.batch_size = int(meta["batch_size"])
        self.caption = meta["caption_key"].replace(".", "_")
        self.encoders: list[TextEncoder] = []

    def setup(self, device) -> None:
        """Load the tokenizers and encoders on ``device``; encode the empty prompt."""
        meta = self.meta
        self.encoders = [
            TextEncoder(e, compute_dtype=meta["compute_dtype"], store_dtype=meta["dtype"],
                        device=device)
            for e in meta["encoders"]
        ]  # fmt: skip
        self.uncond = self.encode_unique([""])[""]
        self.start("")

    def start(self, shard: str, url: str | None = None) -> None:
        self.shard, self.cache, self.cached_bytes = shard, {}, 0
        self.counts = {"captions": 0, "encoded": 0, "null": 0,
                       "truncated": {e.meta["name"]: [0, 0] for e in self.encoders}}  # fmt: skip

    def finish(self, result) -> None:
        result.text = self.stats()

    def stats(self) -> dict:
        """This shard's figures: captions, encoded (distinct), null captions, and per encoder
        [captions cut at max_length, tokens cut in total]."""
        return {
            **self.counts,
            "truncated": {k: list(v) for k, v in self.counts["truncated"].items()},
        }

    def encode_unique(self, captions: Sequence[str]) -> dict[str, dict]:
        """{caption: {column: value}} for distinct captions, in forward passes of exactly
        ``batch_size`` captions (the last padded with empty prompts; see
        :meth:`TextEncoder.batches`)."""
        out: dict[str, dict] = {c: {} for c in captions}
        for enc in self.encoders:
            for chunk, length in enc.batches(captions, self.batch_size):
                padded = chunk + [""] * (self.batch_size - len(chunk))
                cols = enc.encode(padded, length)
                cols[enc.columns["tokens"]] = enc.token_counts(chunk)
                for i, c in enumerate(chunk):
                    out[c].update({k: v[i] for k, v in cols.items()})
        return out

    def embed(self, samples: Sequence) -> tuple[dict[str, np.ndarray | list], list[int], list[str]]:
        """(columns aligned with ``samples``, positions of non-finite samples, their reasons)."""
        captions = [(s.cond or {}).get(self.caption) for s in samples]
        texts = ["" if c is None else c for c in captions]
        new = [c for c in dict.fromkeys(texts) if c not in self.cache]
        if new:
            encoded = self.encode_unique(new)
            for c, row in encoded.items():
                self.counts["encoded"] += 1
                if self.cached_bytes < CACHE_BYTES:
                    self.cache[c] = row
                    self.cached_bytes += sum(np.asarray(v).nbytes for v in row.values())
        else:
            encoded = {}
        rows = [self.cache.get(c) or encoded[c] for c in texts]
        cols: dict[str, np.ndarray | list] = {
            "key": [s.key for s in samples],
            "index": np.array([s.index for s in samples], dtype=np.int64),
            "caption_null": np.array([c is None for c in captions]),
        }
        for name in rows[0] if rows else ():
            cols[name] = np.stack([r[name] for r in rows])
        self._count(rows)
        self.counts["captions"] += len(samples)
        self.counts["null"] += int(cols["caption_null"].sum()) if rows else 0
        bad, reasons = [], []
        for i, r in enumerate(rows):
            worst = [k for k, v in r.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
            if worst:
                bad.append(i)
                reasons.append(
                    f"text embedding not finite ({', '.join(worst)}; text.dtype="
                    f"{self.meta['dtype']}, text.compute_dtype={self.meta['compute_dtype']}): use "
                    "float32"
                )
        return cols, bad, reasons

    def _count(self, rows: Sequence[Mapping]) -> None:
        """Captions cut at an encoder's max_length, and the tokens cut (per sample)."""
        for enc in self.encoders:
            n = np.array([int(r[enc.columns["tokens"]]) for r in rows], dtype=np.int64)
            cut = n[n > enc.max_length] - enc.max_length
            t = self.counts["truncated"][enc.meta["name"]]
            t[0], t[1] = t[0] + len(cut), t[1] + int(cut.sum())

    def process(self, batch: Batch) -> Batch:
        """The batch with its samples' text columns in ``extras``; a sample whose embedding is
        not finite is rejected (a SampleError with ``on_error=fail``)."""
        cols, bad, reasons = self.embed(batch.samples)
        return replace(batch, extras={**batch.extras, **cols}).reject(bad, reasons, self.on_error)

    def uncond_columns(self) -> dict:
        """The empty prompt's row of the text table (``_text/_uncond.parquet``)."""
        cols = {k: np.asarray(v)[None] for k, v in self.uncond.items()}
        return {"key": [""], "index": np.array([-1]), "caption_null": np.array([True]), **cols}
