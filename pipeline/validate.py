"""Validate a precomputed DDPM dataset: ``python -m pipeline.validate output.dir=/data/noised``.

One pass over the records, bounded memory whatever the dataset size: every committed shard is
read one Parquet batch at a time by a Ray task (:func:`scan_shard`), and the per-shard statistics
(mergeable moments, co-moments, reservoirs, hashes; see :mod:`pipeline.stats`) are merged on the
driver as tasks finish (:class:`pipeline.checks.DatasetStats`). Everything about the process comes
from the dataset itself: the manifest's ``process`` block and every file's ``ddpm`` metadata.

The named checks (:mod:`pipeline.checks`) each give a statistic, its expected value and a
tolerance of ``z`` standard errors (raised for families of tests), and a verdict. The report goes
to ``<output.dir>/validation/``: ``report.json``, ``report.md`` and PNG plots.

Exit codes: 0 every check passed (warnings allowed), 1 a check failed, 2 the validator could not
run (no such directory, no manifest, bad config value, ...), with a message naming the path/key.
What a shard scan measures: :class:`pipeline.checks.Stats`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from . import checks, records
from .checks import REC, DatasetStats, ScanPlan, Stats, bin_of_t, seed_of
from .manifest import COMMITTED, MANIFEST, MANIFEST_FORMAT, REJECTS, OutputDir

REPORT_FORMAT = "ddpm-validation/1"
U32 = 2.0**-24  # float32 unit roundoff: relative error bound of one float32 operation


class CannotValidate(RuntimeError):
    """The validator cannot run; the message names the path or config key (exit code 2)."""


def half_ulp(v: np.ndarray) -> np.ndarray:
    """Half the spacing of the stored values (their dtype) at v: the round-to-nearest bound."""
    return 0.5 * np.abs(np.spacing(np.abs(v))).astype(np.float64)


@dataclass
class ShardStats:
    """What :func:`scan_shard` returns: a shard's statistics, identities and noise hashes, or
    the error that stopped its scan."""

    shard: str
    file: str
    num_rows: int = 0
    error: str | None = None
    meta: dict = field(default_factory=dict)
    meta_problems: list = field(default_factory=list)
    seconds: float = 0.0
    stats: Stats | None = None
    hashes: np.ndarray | None = None  # [records, 12] uint8: BLAKE2b of each record's eps bytes
    ids: dict = field(default_factory=dict)


class _Scanner:
    """Accumulates one shard's statistics batch by batch."""

    def __init__(self, st: ShardStats, plan: ScanPlan):
        p = plan.process
        self.st, self.plan = st, plan
        self.sched = records.schedule_from_metadata(p)
        self.noise = records.noise_from_metadata(p)
        self.T, self.K = self.sched.num_timesteps, self.noise.draws
        self.dtype, self.store_x0 = p["dtype"], bool(p["store_x0"])
        self.C, self.P = plan.shape[0], plan.P
        self.tbin = bin_of_t(plan.edges, self.T)
        self.s = st.stats = Stats(plan, plan.seed, st.shard)
        self.pairs: set = set()
        self.draws_per_key: Counter = Counter()
        self.dups = self.bad_draw = 0
        self.hashes: list[bytes] = []
        self.prev = None  # last centred eps row and its norm, for adjacent correlations
        rng = np.random.Generator(np.random.PCG64(seed_of(plan.seed, st.shard, "keyed")))
        quota = min(plan.consistency_quota, st.num_rows)
        self.keyed_rows = set(rng.choice(st.num_rows, size=quota, replace=False).tolist())

    # -- per batch -------------------------------------------------------------------------
    def batch(self, rb, row0: int) -> None:
        n = rb.num_rows
        keys = rb.column("key").to_pylist()
        index = rb.column("index").to_numpy()
        draw = rb.column("draw").to_numpy().astype(np.int64)
        t = rb.column("t").to_numpy().astype(np.int64)
        cols = {c: records.tensor_to_numpy(rb.column(c)) for c in records.TENSOR_COLUMNS}
        if self.store_x0:
            cols["x_0"] = records.tensor_to_numpy(rb.column("x_0"))
        scal = {c: rb.column(c).to_numpy().astype(np.float64) for c in records.SCALAR_COLUMNS}
        self.identities(keys, draw, cols["epsilon"])
        self.regenerate(keys, index, draw, t, cols["epsilon"], row0)
        ok = (t >= 0) & (t < self.T)
        self.s.counts["t_out_of_range"] += int(n - ok.sum())
        finite = np.ones(n, dtype=bool)
        for v in (*cols.values(), *scal.values()):
            finite &= np.isfinite(v.reshape(n, -1)).all(axis=1)
        self.s.counts["nonfinite"] += int((ok & ~finite).sum())
        ok &= finite
        if not ok.all():
            keys = [k for k, o in zip(keys, ok) if o]
            draw, t = draw[ok], t[ok]
            cols = {c: v[ok] for c, v in cols.items()}
            scal = {c: v[ok] for c, v in scal.items()}
        if len(t):
            np.add.at(self.s.t_hist, t, 1)
            self.consistency(keys, draw, t, cols, scal)
            self.moments(t, cols)

    def identities(self, keys, draw, eps) -> None:
        for k, d in zip(keys, draw.tolist()):
            if (k, d) in self.pairs:
                self.dups += 1
            else:
                self.pairs.add((k, d))
                self.draws_per_key[k] += 1
        self.bad_draw += int(((draw < 0) | (draw >= self.K)).sum())
        flat = np.ascontiguousarray(eps).reshape(len(eps), -1)
        self.hashes.extend(hashlib.blake2b(r.tobytes(), digest_size=12).digest() for r in flat)

    def regenerate(self, keys, index, draw, t, eps, row0: int) -> None:
        """Recompute (t, eps) from the record's identity; compare exactly after the dtype cast."""
        kd = self.s.counts
        np_dtype = records.DTYPES[self.dtype][0]
        for i in range(len(keys)):
            if row0 + i not in self.keyed_rows:
                continue
            kd["keyed_checked"] += 1
            d = int(draw[i])
            if not 0 <= d < self.K:
                kd["t_mismatch"] += 1
                kd["eps_mismatch"] += 1
                continue
            dig = self.noise.digests(self.st.shard, [keys[i]])
            t_re = self.noise.timesteps(dig, self.st.shard, [int(index[i])])[d]
            e_re = self.noise.noise(dig[d : d + 1], self.plan.shape)[0].astype(np_dtype)
            kd["t_mismatch"] += int(t_re != t[i])
            kd["eps_mismatch"] += int(e_re.tobytes() != np.ascontiguousarray(eps[i]).tobytes())

    def _tally(self, name, ratio, keys, draw, t) -> None:
        """ratio: [B] worst |error| / tolerance per record (> 1 is a violation)."""
        c = self.s.consistency[name]
        c["checked"] += len(ratio)
        c["violations"] += int((ratio > 1.0).sum())
        if len(ratio) and ratio.max() > c["max_ratio"]:
            w = int(np.argmax(ratio))
            c["max_ratio"] = float(ratio[w])
            c["worst"] = {"key": keys[w], "draw": int(draw[w]), "t": int(t[w])}

    def consistency(self, keys, draw, t, cols, scal) -> None:
        """Every record's arithmetic against the schedule, to the stored dtypes' precision.

        Scalar columns (float32): |stored - table[t]| <= 1 float32 ulp of the table value (its
        rounding is half an ulp; one more allows one float32 operation). Tensor identities: the
        error bound is the sum of half an ulp of every stored operand times its coefficient's
        magnitude, plus 4 float32 roundoffs of the magnitudes involved (float32 arithmetic).
        """
        s = self.sched
        for name, table in (
            ("alpha_bar", s.alphas_cumprod),
            ("posterior_variance", s.posterior_variance),
            ("posterior_log_variance", s.posterior_log_variance_clipped),
        ):
            col = "alpha_bar" if name == "alpha_bar" else name
            exp = table[t]
            tol = np.abs(np.spacing(np.abs(exp).astype(np.float32))).astype(np.float64)
            self._tally(name, np.abs(scal[col] - exp) / tol, keys, draw, t)
        B, shp = len(t), (len(t), self.C, self.P)
        f = {c: v.reshape(shp).astype(np.float64) for c, v in cols.items()}
        h = {c: half_ulp(v).reshape(shp) for c, v in cols.items()}
        a = s.sqrt_alphas_cumprod[t][:, None, None]
        sg = s.sqrt_one_minus_alphas_cumprod[t][:, None, None]
        c1 = s.posterior_mean_coef1[t][:, None, None]
        c2 = s.posterior_mean_coef2[t][:, None, None]
        xt, ep, pm = f["x_t"], f["epsilon"], f["posterior_mean"]

        def worst(err, tol):
            return (np.abs(err) / tol).reshape(len(err), -1).max(axis=1)

        if self.store_x0:
            x0 = f["x_0"]
            tol = h["x_t"] + a * h["x_0"] + sg * h["epsilon"]
            tol += 4 * U32 * (a * np.abs(x0) + sg * np.abs(ep))
            self._tally("x_t", worst(xt - (a * x0 + sg * ep), tol), keys, draw, t)
            tol = h["posterior_mean"] + c1 * h["x_0"] + c2 * h["x_t"]
            tol += 4 * U32 * (c1 * np.abs(x0) + c2 * np.abs(xt) + np.abs(pm))
            self._tally("posterior_mean", worst(pm - (c1 * x0 + c2 * xt), tol), keys, draw, t)
            return
        ok = s.alphas_cumprod[t] >= self.plan.recon_min_alpha_bar
        self.s.counts["unchecked_pm"] += int(B - ok.sum())
        if not ok.any():
            return
        a, sg, c1, c2 = a[ok], sg[ok], c1[ok], c2[ok]
        xt, ep, pm = xt[ok], ep[ok], pm[ok]
        g, q = c1 / a + c2, c1 * sg / a  # pm = g x_t - q eps with x_0 reconstructed
        tol = h["posterior_mean"][ok] + g * h["x_t"][ok] + q * h["epsilon"][ok]
        tol += (
            4 * U32 * (c1 / a * (np.abs(xt) + 2 * sg * np.abs(ep)) + c2 * np.abs(xt) + np.abs(pm))
        )
        sel = np.flatnonzero(ok)
        self._tally(
            "posterior_mean",
            worst(pm - (g * xt - q * ep), tol),
            [keys[i] for i in sel],
            draw[ok],
            t[ok],
        )

    def moments(self, t, cols) -> None:
        st, plan, s = self.s, self.plan, self.sched
        B, C, P = len(t), self.C, self.P
        xt = cols["x_t"].reshape(B, C, P).astype(np.float64)
        ep = cols["epsilon"].reshape(B, C, P).astype(np.float64)
        ab, a, sg = (
            s.alphas_cumprod[t],
            s.sqrt_alphas_cumprod[t],
            s.sqrt_one_minus_alphas_cumprod[t],
        )
        bn, ch = self.tbin[t], np.arange(C)
        st.eps.update(ep, (bn[:, None, None], ch[None, :, None]))
        st.xt.update(xt, (bn[:, None, None], ch[None, :, None]))

        def with_all(v):  # [B, C] -> [B, C + 1], the last column averaging the channels
            return np.concatenate([v, v.mean(axis=1, keepdims=True)], axis=1)

        cells = (np.repeat(bn, C + 1), np.tile(np.arange(C + 1), B))
        per_t = [np.broadcast_to(v[:, None], (B, C + 1)) for v in (ab, a, sg)]
        feats = [with_all(xt.mean(2)), with_all((xt * xt).mean(2)), with_all((xt * ep).mean(2))]
        st.rec.update(np.stack(feats + per_t, axis=-1).reshape(-1, len(REC)), cells)
        if self.store_x0:
            av = np.ones(B, dtype=bool)
            x0 = cols["x_0"].reshape(B, C, P).astype(np.float64)
        else:
            av = ab >= plan.recon_min_alpha_bar
            x0 = (xt[av] - sg[av, None, None] * ep[av]) / a[av, None, None]
        if av.any():
            bav, nav = bn[av], int(av.sum())
            st.x0.update(x0, (bav[:, None, None], ch[None, :, None]))
            f0 = np.stack([with_all(x0.mean(2)), with_all((x0 * x0).mean(2))], axis=-1)
            st.x0rec.update(
                f0.reshape(-1, 2), (np.repeat(bav, C + 1), np.tile(np.arange(C + 1), nav))
            )
            rows = np.stack([ep[av], x0, xt[av]], axis=-1).reshape(-1, 3)
            idx = np.broadcast_to(bav[:, None, None], (nav, C, P)).reshape(-1)
            chx = np.broadcast_to(ch[None, :, None], (nav, C, P)).reshape(-1)
            st.cross.update(rows, (idx, chx))
        st.pos_sum += ep.sum(axis=0).reshape(-1)
        st.pos_n += B
        flat = ep.reshape(B, -1)
        fc = flat - flat.mean(axis=1, keepdims=True)
        norm = np.sqrt((fc * fc).sum(axis=1))
        if self.prev is not None:
            fc, norm = np.concatenate([self.prev[0], fc]), np.concatenate([self.prev[1], norm])
        if len(fc) > 1:
            with np.errstate(invalid="ignore", divide="ignore"):
                r = (fc[:-1] * fc[1:]).sum(axis=1) / (norm[:-1] * norm[1:])
            z = np.nan_to_num(r) * math.sqrt(fc.shape[1] - 1)
            st.adj["n"] += len(z)
            st.adj["sum_z"] += float(z.sum())
            st.adj["max_abs_z"] = max(st.adj["max_abs_z"], float(np.abs(z).max()))
        self.prev = (fc[-1:], norm[-1:])
        st.eps_res.update(cols["epsilon"].reshape(-1))
        top = bn == plan.bins - 1
        if top.any():
            st.xT_res.update(cols["x_t"][top].reshape(-1))
        for b in np.unique(bn) if st.grid else ():
            st.grid[int(b)].update(cols["x_t"][bn == b])

    def finish(self) -> ShardStats:
        st = self.st
        st.hashes = np.frombuffer(b"".join(self.hashes), dtype=np.uint8).reshape(-1, 12)
        wrong = sum(1 for c in self.draws_per_key.values() if c != self.K)
        st.ids = {
            "duplicate_key_draw": self.dups,
            "draw_out_of_range": self.bad_draw,
            "keys": len(self.draws_per_key),
            "keys_without_K_draws": wrong,
        }
        return st


def scan_shard(out: OutputDir, shard: str, plan: ScanPlan) -> ShardStats:
    """Read one committed shard batch by batch and return its statistics. Never raises for a
    bad file: the error is returned in ``ShardStats.error`` (reported by ``completeness``)."""
    t0 = time.perf_counter()
    name = OutputDir.data_name(shard)
    st = ShardStats(shard=shard, file=out.display(name))
    try:
        with out.fs.open_input_file(out.path(name)) as fh:
            pf = pq.ParquetFile(fh)
            st.num_rows = pf.metadata.num_rows
            st.meta = records.process_metadata(pf.schema_arrow)
            st.meta_problems = records.same_process(st.meta, plan.process)
            if st.meta.get("source", {}).get("shard", shard) != shard:
                st.meta_problems.append("source.shard")
            if {"dtype", "shape", "schedule", "noise", "store_x0"} & set(st.meta_problems):
                raise ValueError(
                    f"process metadata differs from the manifest in {st.meta_problems}: not scanned"
                )
            scanner = _Scanner(st, plan)
            cols = list(pf.schema_arrow.names)
            rows = max(1, plan.batch_elements // max(1, scanner.C * scanner.P))
            row0 = 0
            for rb in pf.iter_batches(batch_size=rows, columns=cols):
                scanner.batch(rb, row0)
                row0 += rb.num_rows
            scanner.finish()
    except Exception as exc:  # reported, not raised: one bad shard must not stop the others
        st.error = f"{type(exc).__name__}: {exc}"
    st.seconds = time.perf_counter() - t0
    return st


# -- orchestration ---------------------------------------------------------------------------


def load_config(overrides: Sequence[str] = ()) -> DictConfig:
    """conf/validate.yaml with command-line style overrides (``key=value``)."""
    from .config import compose

    return compose(list(overrides), config_name="validate")


def _check_config(cfg: DictConfig) -> None:
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise CannotValidate(f"config key {key}: {msg}")

    try:
        uri = cfg.output.dir
    except Exception:  # omegaconf MissingMandatoryValue
        uri = None
    need(bool(uri), "output.dir", "required: python -m pipeline.validate output.dir=/path/or/uri")
    need(cfg.z > 0, "z", f"must be > 0, got {cfg.z}")
    need(cfg.bins >= 1, "bins", f"must be >= 1, got {cfg.bins}")
    need(cfg.reservoir_size >= 0, "reservoir_size", f"must be >= 0, got {cfg.reservoir_size}")
    need(cfg.max_consistency_records >= 0, "max_consistency_records", "must be >= 0")
    need(0 < cfg.reconstruct_min_alpha_bar <= 1, "reconstruct_min_alpha_bar", "must be in (0, 1]")
    need(cfg.terminal_mean_shift >= 0, "terminal_mean_shift", "must be >= 0")
    need(0 <= cfg.terminal_window < 1, "terminal_window", "must be in [0, 1)")
    need(cfg.batch_elements >= 1, "batch_elements", f"must be >= 1, got {cfg.batch_elements}")
    need(cfg.ray.num_cpus_per_task > 0, "ray.num_cpus_per_task", "must be > 0")


def open_dataset(uri: str) -> tuple[OutputDir, dict]:
    """The output dir and its manifest; CannotValidate (exit 2) naming the path otherwise."""
    try:
        out = OutputDir(uri)
        info = out.fs.get_file_info(out.root)
    except Exception as exc:
        raise CannotValidate(f"cannot open output.dir {uri!r}: {exc}") from None
    if info.type.name != "Directory":
        raise CannotValidate(f"output.dir {out.display()}: no such directory")
    try:
        manifest = out.read_manifest()
    except Exception as exc:
        raise CannotValidate(f"cannot read {out.display(MANIFEST)}: {exc}") from None
    if manifest is None:
        raise CannotValidate(
            f"no {MANIFEST} in {out.display()}: not written by pipeline.precompute (or never started)"
        )
    if manifest.get("format") != MANIFEST_FORMAT or "process" not in manifest:
        raise CannotValidate(
            f"{out.display(MANIFEST)}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}"
        )
    return out, manifest


def t_edges(T: int, bins: int, terminal_window: float) -> tuple[int, ...]:
    """t-bin edges: ``bins`` equal ranges over [0, T - w), then the terminal bin [T - w, T) with
    w = max(1, round(T * terminal_window)) (where convergence looks at x_T)."""
    w = min(T, max(1, round(T * terminal_window)))
    main = np.floor(np.linspace(0, T - w, min(bins, T - w) + 1)) if T > w else np.zeros(1)
    return tuple(int(e) for e in np.unique(main)) + (T,)


def _plan(cfg: DictConfig, process: dict, n_files: int) -> ScanPlan:
    T = int(process["schedule"]["num_timesteps"])
    edges = t_edges(T, int(cfg.bins), float(cfg.terminal_window))
    quota = math.ceil(cfg.max_consistency_records / max(n_files, 1))
    return ScanPlan(
        process=process,
        edges=edges,
        reservoir_size=int(cfg.reservoir_size),
        recon_min_alpha_bar=float(cfg.reconstruct_min_alpha_bar),
        batch_elements=int(cfg.batch_elements),
        seed=int(cfg.seed),
        consistency_quota=quota,
        grid=bool(cfg.plots),
    )


def _scan_all(cfg: DictConfig, out: OutputDir, shards: list[str], ds: DatasetStats) -> None:
    """Scan the shards as Ray tasks (at most max_in_flight at once), merging as they finish."""
    import ray
    from tqdm import tqdm

    started = not ray.is_initialized()
    if started:
        try:
            ray.init(
                address=cfg.ray.address, include_dashboard=False, logging_level=logging.WARNING
            )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise CannotValidate(
                f"cannot start Ray (ray.address={cfg.ray.address}): {exc}"
            ) from None
    try:
        task = ray.remote(scan_shard).options(num_cpus=cfg.ray.num_cpus_per_task)
        window = cfg.ray.max_in_flight or max(
            2, int(2 * ray.cluster_resources().get("CPU", 1) / cfg.ray.num_cpus_per_task)
        )
        todo, running = list(reversed(shards)), {}
        bar = tqdm(total=len(shards), unit="shard", desc="validate", disable=not cfg.progress)
        with bar:
            while todo or running:
                while todo and len(running) < window:
                    shard = todo.pop()
                    running[task.remote(out, shard, ds.plan)] = shard
                done, _ = ray.wait(list(running), num_returns=1)
                shard = running.pop(done[0])
                try:
                    st = ray.get(done[0])
                except ray.exceptions.RayError as exc:  # the task's process died (OOM, node)
                    st = ShardStats(shard, out.display(OutputDir.data_name(shard)), error=str(exc))
                ds.add(st)
                bar.update(1)
    finally:
        if started:
            ray.shutdown()


def run(cfg: DictConfig) -> dict:
    """Validate the dataset at ``cfg.output.dir``; returns the report (``report["exit_code"]``
    is 0 or 1). Raises :class:`CannotValidate` when it cannot run (exit code 2)."""
    _check_config(cfg)
    t0 = time.perf_counter()
    out, manifest = open_dataset(cfg.output.dir)
    process = manifest["process"]
    entries = manifest.get("shards", {})
    present = set(out.data_files())
    to_scan = [
        k
        for k, e in sorted(entries.items())
        if e.get("status") in COMMITTED and OutputDir.data_name(k) in present
    ]
    try:
        schedule = records.schedule_from_metadata(process)
        noise = records.noise_from_metadata(process)
        records.check_dtype(process["dtype"])
        ds = DatasetStats(_plan(cfg, process, len(to_scan)), entries)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        what = f"{type(exc).__name__}: {exc}"
        raise CannotValidate(f"{out.display(MANIFEST)}: bad process description ({what})") from None
    if to_scan:
        _scan_all(cfg, out, to_scan, ds)
    rejects = out.read_jsonl(REJECTS) if out.exists(REJECTS) else None
    z, fc = float(cfg.z), bool(cfg.family_correction)
    results = [
        checks.completeness(ds, out, manifest, rejects),
        checks.record_consistency(ds, z, fc),
        checks.keyed_noise(ds, z, fc),
        checks.epsilon_moments(ds, z, fc),
        checks.epsilon_normality(ds, z, fc),
        checks.noise_independence(ds, z, fc),
        checks.variance_preservation(ds, z, fc),
        checks.convergence(ds, schedule, z, fc, float(cfg.terminal_mean_shift)),
        checks.timestep_distribution(ds, noise.sampler, z, fc),
    ]
    passed = all(c.passed for c in results)
    report = {
        "format": REPORT_FORMAT,
        "dataset": out.display(),
        "passed": passed,
        "exit_code": 0 if passed else 1,
        "checks": [asdict(c) for c in results],
        "terminal": schedule.terminal(),
        "summary": _summary(manifest, ds, schedule, noise),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    rep = OutputDir(cfg.output.report_dir) if cfg.output.report_dir else out
    prefix = "" if cfg.output.report_dir else "validation/"
    rep.makedirs(prefix.rstrip("/"))
    report["plots"] = _plots(rep, prefix, ds, schedule, report) if cfg.plots else []
    report["report_dir"] = rep.display(prefix.rstrip("/")) if prefix else rep.display()
    rep.write_bytes(prefix + "report.json", _to_json(report).encode())
    rep.write_bytes(prefix + "report.md", format_markdown(report).encode())
    return report


def _summary(manifest: dict, ds: DatasetStats, schedule, noise) -> dict:
    p, t = ds.plan.process, manifest.get("totals", {})
    return {
        "shards": len(manifest.get("shards", {})),
        "scanned_shards": len(ds.shards),
        "records": int(ds.t_hist.sum()),
        **{k: t.get(k) for k in ("samples", "rejected")},
        "schedule": {k: p["schedule"][k] for k in ("name", "num_timesteps", "zero_terminal_snr")},
        **{"sampler": noise.sampler, "draws_per_sample": noise.draws, "seed": noise.seed},
        **{k: p[k] for k in ("dtype", "shape", "store_x0")},
        "source_kind": ds.source_kind or p.get("source", {}).get("kind"),
        "t_bins": list(ds.plan.edges),
    }


def _clean(v):
    """JSON-ready: numpy scalars/arrays to Python, non-finite floats to null."""
    if isinstance(v, Mapping):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, np.ndarray):
        return _clean(v.tolist())
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _to_json(report: dict) -> str:
    return json.dumps(_clean(report), indent=2, sort_keys=False, allow_nan=False) + "\n"


def _num(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _verdict_word(c: dict) -> str:
    return "FAIL" if not c["passed"] else "WARN" if c["severity"] == "warning" else "PASS"


def format_table(report: dict) -> str:
    """The short summary table printed to stdout."""
    rows = [f"{'check':<22} {'verdict':<7} {'statistic':<22} {'value':>9} {'limit':>9}  summary"]
    for c in report["checks"]:
        rows.append(
            f"{c['name']:<22} {_verdict_word(c):<7} {c['detail']['statistic_name']:<22} "
            f"{_num(c['statistic']):>9} {_num(c['threshold']):>9}  {c['summary'][:100]}"
        )
    return "\n".join(rows)


def format_markdown(report: dict) -> str:
    s, term = report["summary"], report["terminal"]
    lines = [
        f"# Validation of `{report['dataset']}`",
        "",
        f"**{'PASSED' if report['passed'] else 'FAILED'}** (exit code {report['exit_code']}); "
        f"{s['records']} records in {s['scanned_shards']} of {s['shards']} shards; schedule "
        f"{s['schedule']['name']} T={s['schedule']['num_timesteps']} (zero_terminal_snr="
        f"{s['schedule']['zero_terminal_snr']}), sampler {s['sampler']}, K={s['draws_per_sample']}, "
        f"{s['dtype']} {s['shape']}, store_x0={s['store_x0']}, source {s['source_kind']}.",
        "",
        "| check | verdict | statistic | value | limit | summary |",
        "|---|---|---|---|---|---|",
    ]
    for c in report["checks"]:
        summ = c["summary"].replace("|", "\\|")
        lines.append(
            f"| {c['name']} | {_verdict_word(c)} | {c['detail']['statistic_name']} | {_num(c['statistic'])} | "
            f"{_num(c['threshold'])} | {summ} |"
        )
    lines += [
        "",
        "Terminal figures (t = T-1): " + ", ".join(f"{k} = {_num(v)}" for k, v in term.items()),
        "",
    ]  # noqa: E501
    for c in report["checks"]:
        lines += [f"## {c['name']}", ""]
        lines += [f"- {n}" for n in c["detail"].get("notes", [])]
        bad = [i for i in c["detail"].get("items", []) if not i.get("passed", True)]
        for i in bad[:20]:
            lines.append(f"- **{i['severity']}** {checks.describe(i)}")
        if c["name"] == "variance_preservation" and c["detail"].get("per_bin"):
            lines += ["", "| t range | records | alpha_bar | Var(x_t) | model | E[x_t] | model |"]
            lines.append("|---|---|---|---|---|---|---|")
            for r in c["detail"]["per_bin"]:
                lines.append(
                    f"| [{r['t_lo']}, {r['t_hi']}) | {r['records']:.0f} | {r['alpha_bar']:.4g} | "
                    f"{r['var_x_t']:.4g} | {r['var_x_t_model']:.4g} | {r['mean_x_t']:.4g} | "
                    f"{r['mean_x_t_model']:.4g} |"
                )
        lines.append("")
    if report.get("plots"):
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]]
    return "\n".join(lines) + "\n"


# -- plots -----------------------------------------------------------------------------------


def _plots(rep: OutputDir, prefix: str, ds: DatasetStats, schedule, report: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import stats as sps

    saved = []

    def save(fig, name):
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        rep.write_bytes(prefix + name, buf.getvalue())
        saved.append(name)

    t = np.arange(schedule.num_timesteps)
    ab = schedule.alphas_cumprod
    vp = next(c for c in report["checks"] if c["name"] == "variance_preservation")["detail"]
    rows, x0 = vp.get("per_bin", []), vp.get("x0", {}).get(str(ds.plan.shape[0]))
    if rows:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        mid = [(r["t_lo"] + r["t_hi"] - 1) / 2 for r in rows]
        a1.plot(mid, [r["var_x_t"] for r in rows], "o", label="empirical (per t-bin)")
        a2.plot(mid, [r["mean_x_t"] for r in rows], "o", label="empirical (per t-bin)")
        if x0:
            a1.plot(t, ab * x0["var"] + 1 - ab, "-", label="ab Var(x_0) + 1 - ab")
            a2.plot(t, np.sqrt(ab) * x0["mean"], "-", label="sqrt(ab) E[x_0]")
        a1.axhline(1.0, color="grey", lw=0.5)
        a1.set(xlabel="t", ylabel="Var(x_t)", title="variance of x_t over t")
        a2.set(xlabel="t", ylabel="E[x_t]", title="mean of x_t over t")
        for a in (a1, a2):
            a.legend()
            a.grid(alpha=0.3)
        save(fig, "var_mean_over_t.png")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    with np.errstate(divide="ignore"):
        a1.plot(t, ab)
        a2.plot(t, schedule.snr)
    a1.set(yscale="log", xlabel="t", title="alpha_bar_t")
    a2.set(yscale="log", xlabel="t", title="SNR(t) = ab / (1 - ab)")
    save(fig, "schedule.png")
    eps = ds.eps_res.sample().astype(np.float64)
    if len(eps):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.hist(eps, bins=80, density=True, alpha=0.6, label=f"eps sample (n={len(eps)})")
        xs = np.linspace(-5, 5, 400)
        ax.plot(xs, sps.norm.pdf(xs), label="N(0, 1)")
        ax.set(xlabel="eps", title="noise vs N(0, 1)")
        ax.legend()
        save(fig, "eps_hist.png")
    xT = np.sort(ds.xT_res.sample().astype(np.float64))
    if len(xT):
        fig, ax = plt.subplots(figsize=(5, 5))
        q = sps.norm.ppf((np.arange(len(xT)) + 0.5) / len(xT))
        ax.plot(q, xT, ".", ms=2)
        ax.plot([-5, 5], [-5, 5], "k-", lw=0.5)
        ax.set(
            xlabel="N(0, 1) quantile", ylabel="x_t quantile", title=f"QQ, t >= {ds.plan.edges[-2]}"
        )
        save(fig, "qq_x_T.png")
    if report["summary"]["source_kind"] == "images" and ds.grid:
        _grid(plt, save, ds)
    return saved


def _grid(plt, save, ds: DatasetStats) -> None:
    """One stored x_t per t-bin, mapped from [-1, 1] to pixels (channels 1, 3 or 4 shown)."""
    bins = sorted(b for b, r in ds.grid.items() if len(r))
    if not bins or len(ds.plan.shape) != 3:
        return
    norm = ds.plan.process.get("source", {}).get("normalize", True)
    fig, axes = plt.subplots(1, len(bins), figsize=(1.8 * len(bins), 2.2), squeeze=False)
    for ax, b in zip(axes[0], bins):
        x = ds.grid[b].sample()[0].astype(np.float64)
        img = np.clip((x + 1) / 2 if norm else x, 0, 1)
        img = img[0] if img.shape[0] in (1, 2) else np.moveaxis(img[:3], 0, -1)
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
        ax.set_title(f"t~{(ds.plan.edges[b] + ds.plan.edges[b + 1] - 1) // 2}", fontsize=8)
        ax.axis("off")
    save(fig, "x_t_grid.png")


# -- entry points ----------------------------------------------------------------------------


def run_validation(output_dir: str, *overrides: str) -> int:
    """Validate ``output_dir`` with default settings (plus overrides); print; return the exit code."""
    return main([f"output.dir={output_dir}", *overrides])


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``diffusion-validate output.dir=... [key=value ...]``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        from .config import CONF_DIR

        print(__doc__.split("\n\n")[0] + "\n\nKeys, set as key=value (conf/validate.yaml):\n")
        print((CONF_DIR / "validate.yaml").read_text())
        return 0
    try:
        cfg = load_config(argv)
        report = run(cfg)
    except CannotValidate as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # hydra override errors, unreadable config, ...
        if type(exc).__module__.split(".")[0] in ("hydra", "omegaconf"):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    print(format_table(report))
    for c in report["checks"]:
        bad = [i for i in c["detail"]["items"] if not i["passed"]]
        for i in bad[:3]:
            print(f"  {c['name']} {i['severity']}: {checks.describe(i)}")
        if len(bad) > 3:
            print(f"  {c['name']}: {len(bad) - 3} more in the report")
        for n in c["detail"].get("notes", []):
            if "not unit-variance" in n or "NOT " in n:
                print(f"  note ({c['name']}): {n}")
    print(f"{'PASSED' if report['passed'] else 'FAILED'}; report: {report['report_dir']}/report.md")
    return report["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
