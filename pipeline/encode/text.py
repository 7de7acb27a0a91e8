"""Text embeddings: frozen CLIP / T5 text encoders turn each sample's caption into the tensors a
text-to-image denoiser is conditioned on, computed once, offline, beside the latents.

``text=clip|t5|sdxl|sd3|flux`` (config group ``text``, :class:`pipeline.run.config.TextConfig`)
lists encoders; each has a ``model`` (Hub id or local folder; the presets take ``text.model`` as a
diffusers pipeline root and give each encoder its ``subfolder``), ``tokenizer_subfolder``,
``max_length``, ``output`` (``last``, ``penultimate``, ``pooled``), ``attention_mask`` and
``name`` (the column prefix). Three parts:

* **Identity, on the driver, without loading a model** (:func:`describe_text`): each encoder's
  folder is resolved like the VAE's (:func:`pipeline.encode.encoder.locate`), its ``config.json``,
  safetensors weights and tokenizer files are hashed (sha256). The identity (class, model,
  revision, hashes, max_length, outputs, dtype) goes into every file's metadata (``text``), the
  manifest and the config hash: another encoder or another tokenizer into an existing output dir
  is refused (exit 2) like another VAE. Pickled weights are refused.
* **Columns** (:func:`text_columns`): per encoder ``<name>_hidden`` [L, D] (``last`` or
  ``penultimate``), ``<name>_pooled`` [D] and ``<name>_mask`` int8 [L] (the tokenizer's attention
  mask, always kept: a trainer may use it even where the pipeline does not), ``<name>_tokens``
  int32 (the caption's token count before truncation) and ``caption_null`` (the sample had no
  caption and took the empty prompt's embedding).
* **Presets** (:func:`assemble`): ``sdxl``, ``sd3`` and ``flux`` store each encoder's outputs;
  :func:`assemble` joins them into exactly the ``prompt_embeds`` and ``pooled_prompt_embeds`` the
  diffusers pipeline's ``encode_prompt`` computes (concatenation and zero padding only, so no
  value changes).

Storage (:mod:`pipeline.output.text_store`): embeddings are per *sample*, not per record, so they
live in one table per shard, ``_text/<shard>.parquet`` (one row per sample whose records were
written, joined to the records by ``index``), committed with the shard before its marker; the empty
prompt's embedding is stored once per dataset in ``_text/_uncond.parquet``. With K draws a
sample's embeddings take the bytes of one (CLIP-L in float16 is 118 KiB per sample, T5-XXL at 256
tokens 2 MiB: K copies would dwarf the latents). The encoding runs on the actor
(:mod:`pipeline.encode.text_encode`).
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.encode.encoder import locate
from pipeline.encode.modelfiles import (
    CONFIG_NAME,
    ModelFilesError,
    ModelFolder,
    file_sha256,
    hash_weights,
    hub_snapshot,
    is_hub_id,
    subfolder_patterns,
    weight_files,
)

KINDS = ("none", "clip", "t5", "sdxl", "sd3", "flux")
PRESETS = ("sdxl", "sd3", "flux")
OUTPUTS = ("last", "penultimate", "pooled")
MODEL_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")
STORE_DTYPES = ("float16", "float32")
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
# The tokenizer files transformers reads (none of them is a pickle; spiece.model is protobuf).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "spiece.model", "added_tokens.json",
)  # fmt: skip
INSTALL_HINT = "pip install diffusion-precompute[text]"
# Where the encoder was read from, not what it is: out of the config hash.
LOCATION_FIELDS = ("model", "location", "folder", "revision", "resolved_revision")
UNHASHED_FIELDS = (*LOCATION_FIELDS, "batch_size")


class TextError(ModelFilesError):
    """A text encoder cannot be used as configured; the message names the key, path and fix."""


def enabled(cfg) -> bool:
    """True when the config selects text encoders (``text=clip|t5|sdxl|sd3|flux``)."""
    t = cfg.get("text") if hasattr(cfg, "get") else None
    return t is not None and t.get("kind", "none") != "none"


def require_transformers() -> None:
    import importlib.util

    missing = [m for m in ("transformers", "safetensors") if importlib.util.find_spec(m) is None]
    if missing:
        raise TextError(f"text encoders need {' and '.join(missing)}: {INSTALL_HINT}")


# -- columns -------------------------------------------------------------------------------------


def column_names(encoder: Mapping) -> dict[str, str]:
    """{output or extra: column} of one encoder entry of the metadata (``name``, ``output``)."""
    name, outs = encoder["name"], encoder["output"]
    cols = {}
    hidden = [o for o in outs if o != "pooled"]
    if hidden:
        cols[hidden[0]] = f"{name}_hidden"
    if "pooled" in outs:
        cols["pooled"] = f"{name}_pooled"
    cols["mask"] = f"{name}_mask"
    cols["tokens"] = f"{name}_tokens"
    return cols


def text_columns(meta: Mapping) -> list[tuple[str, str, tuple[int, ...] | None]]:
    """(column, Arrow dtype or "store", tensor shape or None) of a text table, in schema order:
    ``key``, ``index``, ``caption_null``, then per encoder its columns (``meta``: the metadata's
    ``text`` entry)."""
    out = [("key", "string", None), ("index", "int64", None), ("caption_null", "bool", None)]
    for e in meta["encoders"]:
        L, D = int(e["max_length"]), int(e["hidden_size"])
        for what, col in column_names(e).items():
            if what == "pooled":
                out.append((col, "store", (int(e["pooled_size"]),)))
            elif what == "mask":
                out.append((col, "int8", (L,)))
            elif what == "tokens":
                out.append((col, "int32", None))
            else:
                out.append((col, "store", (L, D)))
    return out


def embedding_columns(meta: Mapping) -> list[str]:
    """The tensor columns a trainer reads (hidden, pooled, mask of every encoder)."""
    return [c for c, _, shape in text_columns(meta) if shape is not None]


# -- presets -------------------------------------------------------------------------------------


def assemble(preset: str, emb: Mapping, dims: Mapping | None = None) -> dict:
    """``prompt_embeds`` and ``pooled_prompt_embeds`` of diffusers' pipeline ``preset`` from the
    stored columns ``emb`` (torch tensors, batched [B, ...] or not). Only concatenation and zero
    padding: the values are the stored ones.

    * sdxl: cat(clip_l_hidden, clip_g_hidden) on D [77, 2048]; pooled: clip_g_pooled [1280].
    * sd3: cat(clip_l_hidden, clip_g_hidden) on D, zero-padded to T5's D, then cat with
      t5_hidden on L [77 + 256, 4096]; pooled: cat(clip_l_pooled, clip_g_pooled) [2048].
    * flux: t5_hidden [512, 4096]; pooled: clip_l_pooled [768].
    """
    import torch

    if preset == "sdxl":
        hidden = torch.cat([emb["clip_l_hidden"], emb["clip_g_hidden"]], dim=-1)
        return {"prompt_embeds": hidden, "pooled_prompt_embeds": emb["clip_g_pooled"]}
    if preset == "sd3":
        clip = torch.cat([emb["clip_l_hidden"], emb["clip_g_hidden"]], dim=-1)
        t5 = emb["t5_hidden"]
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        pooled = torch.cat([emb["clip_l_pooled"], emb["clip_g_pooled"]], dim=-1)
        return {"prompt_embeds": torch.cat([clip, t5], dim=-2), "pooled_prompt_embeds": pooled}
    if preset == "flux":
        return {"prompt_embeds": emb["t5_hidden"], "pooled_prompt_embeds": emb["clip_l_pooled"]}
    raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")


# -- identity ------------------------------------------------------------------------------------


CONVERT = "<Model>.from_pretrained(folder).save_pretrained(folder)"


def hash_model(mf: ModelFolder, key: str) -> dict:
    """config.json (parsed) and the sha256 of it and of every weights file of a text encoder."""
    try:
        fs, root, names = mf.listing(key)
        if CONFIG_NAME not in names:
            hint = " (a pipeline repo: set its subfolder, e.g. text_encoder)" if (
                "model_index.json" in names) else ""  # fmt: skip
            raise TextError(f"{key}: {mf.display()} has no {CONFIG_NAME}{hint}")
        config, config_sha = mf.read_config(fs, root)
        cls = (config.get("architectures") or [None])[0]
        if cls not in MODEL_CLASSES:
            raise TextError(
                f"{key}: {mf.display(CONFIG_NAME)} describes {cls!r}; text encoders are one of "
                f"{MODEL_CLASSES}"
            )

        def read_index() -> bytes:
            with fs.open(posixpath.join(root, INDEX_NAME), "rb") as f:
                return f.read()

        files = weight_files(names, WEIGHTS_NAME, read_index, mf.display(), CONVERT)
        weights = hash_weights(mf, fs, root, files)
    except ModelFilesError as exc:
        raise TextError(str(exc)) from None
    return {"class": cls, "config": config, "config_sha256": config_sha, "weights_sha256": weights}


def hash_tokenizer(mf: ModelFolder, key: str) -> dict[str, str]:
    """{tokenizer file: sha256} of a tokenizer folder (the files transformers reads)."""
    try:
        fs, root, names = mf.listing(key)
    except ModelFilesError as exc:
        raise TextError(str(exc)) from None
    files = sorted(n for n in names if n in TOKENIZER_FILES)
    if "tokenizer.json" not in files and not {"vocab.json", "spiece.model"} & set(files):
        raise TextError(
            f"{key}: {mf.display()} holds no tokenizer (tokenizer.json, vocab.json + merges.txt "
            "or spiece.model): set tokenizer_subfolder"
        )
    return {n: file_sha256(fs, posixpath.join(root, n)) for n in files}


def _dims(cls: str, config: Mapping) -> tuple[int, int]:
    """(hidden size, pooled size) of a text encoder from its config.json."""
    if cls.startswith("T5"):
        return int(config["d_model"]), 0
    hidden = int(config["hidden_size"])
    return hidden, int(config.get("projection_dim", hidden)) if cls.endswith(
        "Projection") else hidden  # fmt: skip


@dataclass(frozen=True)
class Resolved:
    """Where one encoder's model and tokenizer are (the actor fetches them from here)."""

    model: ModelFolder
    tokenizer: ModelFolder


def _locate(model, revision, subfolder, key: str) -> ModelFolder:
    """A local folder (resolved like the VAE's: :func:`pipeline.encode.encoder.locate`) or a Hub
    id."""
    if not model:
        raise TextError(f"config key {key}: required (a local folder or a Hub id)")
    model = str(model)
    if "://" in model and not model.startswith("file://"):
        raise TextError(
            f"{key}={model}: remote folders are not supported for text encoders; use a local or "
            "shared folder, or a Hub id"
        )
    if _is_dir(model):
        return locate(model.removeprefix("file://"), revision, subfolder)
    if is_hub_id(model):
        return _hub(model, revision, subfolder, key)
    raise TextError(f"{key}={model}: no such folder, and not a Hugging Face Hub id (owner/name)")


def _is_dir(path: str) -> bool:
    from pathlib import Path

    return Path(path.removeprefix("file://")).expanduser().is_dir()


def _hub(model: str, revision, subfolder, key: str) -> ModelFolder:
    """A Hub snapshot of the encoder's (or tokenizer's) subfolder: config, safetensors and
    tokenizer files only (:func:`pipeline.encode.modelfiles.hub_snapshot`, cached per process)."""
    from pathlib import Path

    sub = (subfolder or "").strip("/")
    names = (CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME, *TOKENIZER_FILES, "model-*.safetensors")
    try:
        root, commit = hub_snapshot(model, revision, subfolder_patterns(sub, names))
    except Exception as exc:
        raise TextError(
            f"{key}={model} (revision {revision or 'main'}): cannot fetch it from the Hugging Face "
            f"Hub ({type(exc).__name__}: {exc}); download it beforehand or give a local folder"
        ) from exc
    return ModelFolder("hub", str(Path(root) / sub) if sub else str(root), commit)


def describe_text(cfg) -> dict:
    """The ``text`` entry of the metadata (driver side: files hashed, no model loaded)."""
    require_transformers()
    t = cfg.text
    store = t.dtype or cfg.output.dtype
    encoders = []
    for i, e in enumerate(t.encoders):
        key = f"text.encoders[{i}] ({e.name})"
        model = e.model or t.model
        revision = e.revision if e.revision is not None else t.revision
        mf = _locate(model, revision, e.subfolder, f"{key}.model")
        tf = _locate(model, revision, e.tokenizer_subfolder, f"{key}.tokenizer_subfolder")
        m = hash_model(mf, key)
        hidden, pooled = _dims(m["class"], m["config"])
        if "pooled" in e.output and not pooled:
            raise TextError(f"{key}.output: {m['class']} has no pooled output; use last")
        positions = m["config"].get("max_position_embeddings")  # CLIP: absolute positions
        if positions is not None and int(e.max_length) > int(positions):
            raise TextError(
                f"text.encoders.{i}.max_length={e.max_length}: {m['class']} of {mf.display()} "
                f"has {positions} position embeddings; set text.encoders.{i}.max_length="
                f"{positions} or less"
            )
        entry = {
            "name": e.name,
            "class": f"transformers.{m['class']}",
            "model": str(model),
            "location": mf.location,
            "folder": mf.folder,
            "tokenizer_folder": tf.folder,
            "revision": revision,
            "resolved_revision": mf.resolved_revision,
            "subfolder": e.subfolder,
            "tokenizer_subfolder": e.tokenizer_subfolder,
            "config_sha256": m["config_sha256"],
            "weights_sha256": m["weights_sha256"],
            "tokenizer_sha256": hash_tokenizer(tf, key),
            "max_length": int(e.max_length),
            "output": list(e.output),
            "attention_mask": bool(e.attention_mask),
            "hidden_size": hidden,
            "pooled_size": pooled,
        }  # fmt: skip
        if e.length_bucket:  # only when set: the identity of existing configs is unchanged
            entry["length_bucket"] = int(e.length_bucket)
        encoders.append(entry)
    return {
        "kind": t.kind,
        "preset": t.kind if t.kind in PRESETS else None,
        "caption_key": t.caption_key,
        "dtype": store,
        "compute_dtype": t.compute_dtype,
        "batch_size": int(t.batch_size),
        "encoders": encoders,
    }


def hashed_identity(described: Mapping) -> dict:
    """What of :func:`describe_text` enters the config hash: what the encoders are (class,
    hashes, lengths, outputs, dtype), not where they were read from."""
    out = {k: v for k, v in described.items() if k not in UNHASHED_FIELDS}
    out["encoders"] = [
        {k: v for k, v in e.items() if k not in (*LOCATION_FIELDS, "tokenizer_folder")}
        for e in described.get("encoders", [])
    ]
    return out


def summary(described: Mapping | None) -> str:
    """One line naming the text encoders (for the refusal of others in an output dir)."""
    if not described:
        return "no text encoders"
    parts = []
    for e in described["encoders"]:
        w = ",".join(v[:12] for v in e["weights_sha256"].values())
        tok = ",".join(v[:8] for v in e["tokenizer_sha256"].values())
        parts.append(
            f"{e['name']}={e['model']} {e['class']} (weights {w}, tokenizer {tok}, "
            f"max_length {e['max_length']}, {'+'.join(e['output'])})"
        )
    return f"{described['kind']} [{'; '.join(parts)}] dtype {described['dtype']}"


def problems(cfg) -> list[tuple[str, str]]:
    """(config key, message) for every invalid ``text`` value (checked before any model)."""
    t = cfg.get("text")
    if t is None or t.kind == "none":
        return []
    out = []
    if t.kind not in KINDS:
        out.append(("text.kind", f"must be one of {KINDS}, got {t.kind!r}"))
    if t.dtype is not None and t.dtype not in STORE_DTYPES:
        out.append(("text.dtype", f"must be null (output.dtype) or one of {STORE_DTYPES}"))
    if t.compute_dtype not in COMPUTE_DTYPES:
        out.append(("text.compute_dtype", f"must be one of {COMPUTE_DTYPES}"))
    if t.batch_size < 1:
        out.append(("text.batch_size", f"must be >= 1, got {t.batch_size}"))
    from pipeline.read.conditioning import column_name

    keep = [column_name(k) for k in (cfg.source.get("keep") or [])]
    if column_name(t.caption_key) not in keep:
        out.append((
            "text.caption_key",
            f"{t.caption_key!r} must be one of source.keep ({keep}): the caption is read from "
            f"that member; add it: source.keep=[...,{t.caption_key}]",
        ))  # fmt: skip
    if not t.encoders:
        out.append(("text.encoders", "must list at least one encoder"))
    names = [e.name for e in t.encoders]
    if len(set(names)) != len(names):
        out.append(("text.encoders", f"names must be distinct, got {names}"))
    for i, e in enumerate(t.encoders):
        key = f"text.encoders[{i}]"
        if not (e.model or t.model):
            out.append((f"{key}.model", "required: set text.model=<folder or Hub id>"))
        bad = [o for o in e.output if o not in OUTPUTS]
        if bad or not e.output:
            out.append((f"{key}.output", f"must be a non-empty list of {OUTPUTS}, got {e.output}"))
        if "last" in e.output and "penultimate" in e.output:
            out.append((f"{key}.output", "last and penultimate share <name>_hidden: pick one"))
        if e.max_length < 1:
            out.append((f"{key}.max_length", f"must be >= 1, got {e.max_length}"))
        if e.length_bucket < 0:
            out.append((f"{key}.length_bucket", f"must be >= 0, got {e.length_bucket}"))
        elif e.length_bucket and not e.attention_mask:
            out.append((
                f"{key}.length_bucket",
                "needs attention_mask: true (without the mask the padded positions change the "
                "embedding, so every caption is padded to max_length); set it or use 0",
            ))  # fmt: skip
        if not str(e.name).isidentifier():
            out.append((f"{key}.name", f"must be an identifier (a column prefix), got {e.name!r}"))
    return out
