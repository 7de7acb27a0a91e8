"""The validator's ``text`` check: are the stored text embeddings the encoders' and consistent?

For a dataset made with ``text=...`` (the metadata's ``text`` entry; other datasets: not
applicable), over every committed shard's ``_text/<shard>.parquet`` (see
:mod:`pipeline.output.text_store`):

* **rows**: one per sample with records (the records' distinct ``index`` values), no more;
* **null captions**: ``caption_null`` equals "the records' caption column is null", and the count;
* **same caption, same embedding**: a digest of each sample's stored values per caption, across
  all shards (the text stage encodes in fixed-size batches, so on one device and build equal
  captions give equal bytes);
* **truncation**: per encoder, captions longer than ``max_length`` tokens and the mean tokens cut;
* **norms**: per encoder, the mean and spread of the per-sample L2 norms of hidden and pooled
  (figures for the report; a non-finite value fails);
* **re-encoding** (``text_recheck`` captions, 0: skipped): the encoders are loaded on the CPU from
  the hashed files and a deterministic sample of captions (and the empty prompt of
  ``_text/_uncond.parquet``) is encoded again; the stored values must equal them to the storage
  dtype's rounding plus cross-device float32 differences (:data:`RTOL`).

Unlike the scan-based checks it reads files itself (the text tables, the records' caption
column): the embeddings are not part of the records the scan measures.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.encode.text import column_names, embedding_columns
from pipeline.output.description import ProcessMetadata
from pipeline.output.text_store import UNCOND, table_name, to_numpy
from pipeline.read.buckets import data_names_by_shard
from pipeline.validate.checks.context import Context
from pipeline.validate.verdict import Check, litem, verdict

NAME = "text"
# Relative tolerance of a re-encoded value against the stored one, by storage dtype: half an ulp
# of float16 (2^-11) twice, plus float32 differences between devices' kernels.
RTOL = {"float16": 2e-3, "float32": 1e-4}


def _digest(row: Mapping[str, np.ndarray], cols) -> str:
    h = hashlib.blake2b(digest_size=16)
    for c in cols:
        h.update(np.ascontiguousarray(row[c]).tobytes())
    return h.hexdigest()


def check_text(out, meta: Mapping, shards, recheck: int = 16) -> dict:
    """Figures and problems of the text embeddings of ``out`` (an OutputDir): ``meta`` is the
    dataset's process metadata, ``shards`` the committed shard ids. Returns ``{"applies",
    "passed", "problems": [...], "figures": {...}}``."""
    t = ProcessMetadata.from_json(meta).text
    if not t:
        return {"applies": False, "passed": True, "problems": [], "figures": {}}
    caption_col = t["caption_key"].replace(".", "_")
    emb_cols = embedding_columns(t)
    value_cols = [c for c in emb_cols if not c.endswith("_mask")]
    problems: list[str] = []
    by_caption: dict[str, tuple[str, str]] = {}
    samples = nulls = mismatched = 0
    trunc = {e["name"]: [0, 0] for e in t["encoders"]}
    norms: dict[str, list] = {c: [] for c in value_cols}
    recheck_rows: dict[str, dict] = {}
    data = data_names_by_shard(out.data_files(), shards)  # one file, or one per bucket
    for shard in shards:
        name = table_name(shard)
        if not out.exists(name):
            problems.append(f"{out.display(name)} is missing: shard {shard} has no embeddings")
            continue
        table = pq.read_table(out.path(name), filesystem=out.fs)
        cols = to_numpy(table)
        rec = pa.concat_tables(
            pq.read_table(out.path(n), filesystem=out.fs, columns=["index", caption_col])
            for n in data.get(shard) or [out.data_name(shard)]
        )
        rec_index = rec.column("index").to_numpy()
        captions = dict(zip(rec_index.tolist(), rec.column(caption_col).to_pylist()))
        if sorted(cols["index"].tolist()) != sorted(captions):
            problems.append(
                f"{out.display(name)}: {len(cols['index'])} rows for {len(captions)} samples "
                "with records: the table does not match its shard"
            )
            continue
        samples += len(cols["index"])
        nulls += int(cols["caption_null"].sum())
        for e in t["encoders"]:
            n = cols[column_names(e)["tokens"]].astype(np.int64)
            cut = n[n > e["max_length"]] - e["max_length"]
            trunc[e["name"]][0] += len(cut)
            trunc[e["name"]][1] += int(cut.sum())
        for c in value_cols:
            v = cols[c].astype(np.float64).reshape(len(cols[c]), -1)
            if not np.isfinite(v).all():
                problems.append(f"{out.display(name)}: non-finite values in {c}")
            norms[c].append(np.linalg.norm(v, axis=1))
        for i, idx in enumerate(cols["index"].tolist()):
            cap = captions[idx]
            if bool(cols["caption_null"][i]) != (cap is None):
                problems.append(
                    f"{out.display(name)} index {idx}: caption_null is "
                    f"{bool(cols['caption_null'][i])} but the record's {caption_col} is "
                    f"{'null' if cap is None else 'set'}"
                )
            text = "" if cap is None else cap
            row = {c: cols[c][i] for c in value_cols}
            d = _digest(row, value_cols)
            first = by_caption.setdefault(text, (d, f"{shard}/{idx}"))
            if first[0] != d:
                mismatched += 1
                if mismatched <= 3:
                    problems.append(
                        f"caption {text[:40]!r}: embeddings differ between {first[1]} and "
                        f"{shard}/{idx}"
                    )
            if text not in recheck_rows:
                recheck_rows[text] = row
    figures = {
        "samples": samples,
        "distinct_captions": len(by_caption),
        "null_captions": nulls,
        "same_caption_mismatches": mismatched,
        "truncated": {
            k: {"captions": v[0], "mean_tokens_cut": v[1] / v[0] if v[0] else 0.0}
            for k, v in trunc.items()
        },  # fmt: skip
        "norms": {c: _spread(np.concatenate(v)) for c, v in norms.items() if v},
    }
    if recheck > 0 and samples:
        err = _recheck(out, t, recheck_rows, value_cols, recheck, problems)
        figures["recheck"] = err
    return {"applies": True, "passed": not problems, "problems": problems, "figures": figures}


def _spread(x: np.ndarray) -> dict:
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()),
            "max": float(x.max())}  # fmt: skip


def _recheck(out, t: Mapping, rows: dict, cols, n: int, problems: list) -> dict:
    """Encode ``n`` captions (the smallest by sha256: deterministic) and the empty prompt again
    on the CPU; the largest relative error per column."""
    import torch

    from pipeline.encode.text_encode import TextStage

    pick = sorted(rows, key=lambda c: hashlib.sha256(c.encode()).hexdigest())[:n]
    stage = TextStage(t)
    stage.setup(torch.device("cpu"))
    fresh = stage.encode_unique(pick)
    uncond = to_numpy(pq.read_table(out.path(UNCOND), filesystem=out.fs))
    stored = {**{c: rows[c] for c in pick}, "\0uncond": {k: uncond[k][0] for k in cols}}
    fresh["\0uncond"] = stage.uncond
    rtol = RTOL[t["dtype"]]
    worst = {c: 0.0 for c in cols}
    for cap, row in stored.items():
        for c in cols:
            a = row[c].astype(np.float64)
            b = fresh[cap][c].astype(np.float64)
            err = float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))
            worst[c] = max(worst[c], err)
            if err > rtol:
                what = "the empty prompt" if cap == "\0uncond" else f"caption {cap[:40]!r}"
                problems.append(
                    f"{c} of {what}: stored values differ from the encoder's by {err:.3g} "
                    f"(relative; allowed {rtol:g} for {t['dtype']}): the embeddings are not "
                    "this encoder's output"
                )
    return {"captions": len(pick), "max_relative_error": worst, "rtol": rtol}


def run(ctx: Context) -> Check | None:
    """The check on the validator's dataset; None when it has no text embeddings."""
    meta = ctx.ds.plan.process
    if not meta.text:
        return None
    shards = sorted(s for s, e in ctx.manifest.get("shards", {}).items()
                    if e.get("status") in ("ok", "partial"))  # fmt: skip
    res = check_text(ctx.out, meta, shards, int(ctx.cfg.get("text_recheck", 16)))
    f = res["figures"]
    items = [litem("all shards", p, 1, 0) for p in res["problems"]]
    items.append(litem("all shards", "same caption, different embedding",
                       f["same_caption_mismatches"], 0))  # fmt: skip
    notes = [
        f"{f['samples']} samples, {f['distinct_captions']} distinct captions, "
        f"{f['null_captions']} without a caption (empty prompt's embedding)"
    ]
    for name, tr in f["truncated"].items():
        notes.append(f"{name}: {tr['captions']} captions cut at max_length "
                     f"(mean {tr['mean_tokens_cut']:.1f} tokens cut)")  # fmt: skip
    for col, n in f["norms"].items():
        notes.append(f"{col}: L2 norm mean {n['mean']:.4g} (std {n['std']:.3g}, "
                     f"min {n['min']:.4g}, max {n['max']:.4g})")  # fmt: skip
    if "recheck" in f:
        worst = max(f["recheck"]["max_relative_error"].values(), default=0.0)
        notes.append(
            f"re-encoded {f['recheck']['captions']} captions and the empty prompt on "
            f"the CPU: max relative error {worst:.3g} (allowed {f['recheck']['rtol']:g})"
        )
    else:
        notes.append("re-encoding skipped (text_recheck=0)")
    return verdict(NAME, [items], z=0.0, correct=False, notes=notes,
                   statistic=float(len(res["problems"])), threshold=0.0,
                   extra={"statistic_name": "problems", **f})  # fmt: skip
