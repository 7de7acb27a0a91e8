"""The command line of both CLIs: Hydra overrides as users write them, and what Hydra lets
through or refuses, said in one line naming the config key (exit code 2).

* :func:`quote_url_overrides`: ``source.urls=/data/train-{000000..000099}.tar`` works unquoted.
* :func:`check_keys`: a key a schema lacks (added with ``+``/``++``) or a required value unset.
* :func:`config_error_message`: one line for a Hydra or OmegaConf error.
* :func:`multirun_refusal`: ``-m`` is refused (one command makes one dataset).
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

_REQUIRED_EXAMPLE = {
    "output.dir": "output.dir=/path/to/output",
    "source.urls": "source.urls=/data/train-{000000..000099}.tar",
}


def _required_message(key: str) -> str:
    return f"config key {key} is required: add {_REQUIRED_EXAMPLE.get(key, key + '=<value>')}"


def check_keys(cfg: DictConfig, required: bool = True) -> None:
    """Refuse what Hydra's composition lets through: a key that a node's schema (dataclass) lacks,
    which ``+key=value`` and ``++key=value`` add past struct mode, so a typo such as
    ``+sampling.draw_per_sample=2`` would otherwise be kept silently; with ``required``, a
    required value (``???``) left unset. Raises ConfigCompositionException naming the key."""
    import dataclasses
    import difflib

    from hydra.errors import ConfigCompositionException

    def walk(node: DictConfig, prefix: str) -> None:
        schema = OmegaConf.get_type(node)
        fields = (
            [f.name for f in dataclasses.fields(schema)]
            if dataclasses.is_dataclass(schema)
            else None
        )
        for key in node.keys():
            name = f"{prefix}{key}"
            if fields is not None and key not in fields:
                near = difflib.get_close_matches(str(key), fields, n=1)
                hint = f"; did you mean {prefix}{near[0]}?" if near else ""
                raise ConfigCompositionException(
                    f"config key {name}: not a key of {schema.__name__} (a typo?){hint}"
                )
            if OmegaConf.is_missing(node, key) or OmegaConf.is_interpolation(node, key):
                continue
            if isinstance(node[key], DictConfig):
                walk(node[key], f"{name}.")

    walk(cfg, "")
    missing = sorted(OmegaConf.missing_keys(cfg)) if required else []
    if missing:
        raise ConfigCompositionException("; ".join(_required_message(k) for k in missing))


def config_error_message(exc: BaseException) -> str:
    """One line for a config error that Hydra or OmegaConf raised: what both CLIs print before
    exiting 2 (a missing required value, an unknown key, an override grammar error, ...)."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    def first_line(e: BaseException) -> str:
        return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)

    key = getattr(exc, "full_key", None)
    if isinstance(exc, MissingMandatoryValue) and key:
        return _required_message(key)
    if isinstance(exc, OverrideParseException):
        return (
            f"cannot parse the override {exc.override!r}: {first_line(exc)} (grammar: "
            "https://hydra.cc/docs/advanced/override_grammar/basic/; quote values with spaces)"
        )
    if isinstance(exc, MissingConfigException):
        options = [o for o in exc.options or () if not o.startswith("base_")]
        return first_line(exc) + (f"; options: {', '.join(options)}" if options else "")
    cause = exc.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return f"config key {cause.full_key}: {first_line(cause)}"
    if key:
        return f"config key {key}: {first_line(exc)}"
    return " ".join(ln.strip() for ln in str(exc).splitlines() if ln.strip())


def quote_url_overrides(argv: list[str]) -> list[str]:
    """Quote ``source.urls=`` values for Hydra's override grammar, so WebDataset brace patterns
    work as users write them: ``source.urls=/data/train-{000000..000099}.tar``."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") == "source.urls" and value[:1] not in ("'", '"', "["):
            value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        out.append(f"{key}{sep}{value}" if sep else arg)
    return out


def multirun_refusal(argv: list[str]) -> str | None:
    """Why a command line that asks Hydra for a multirun (``-m``/``--multirun``, also
    abbreviated, or ``hydra.mode=MULTIRUN``) is refused, None for a single run.

    One command makes one dataset: Hydra's sweeper would write ``multirun.yaml`` into a local
    sweep directory (the working directory, or a local path named after an ``s3://`` output)
    and run the jobs one after another in this process, every job into the same output.dir,
    and a job that stops its process stops the sweep. A loop of commands gives each dataset its
    own output.dir, exit code and resume."""
    from hydra._internal.utils import get_args_parser  # the parser hydra.main itself uses

    args, _ = get_args_parser().parse_known_args(argv)
    mode = [a.partition("=")[2] for a in args.overrides if a.lstrip("+~").startswith("hydra.mode=")]
    if not args.multirun and not any(m.strip("'\"").upper() == "MULTIRUN" for m in mode):
        return None
    sweeps = [
        a
        for a in args.overrides
        if "," in a.partition("=")[2] and a.partition("=")[0].lstrip("+~") != "source.urls"
    ]
    key, _, values = (sweeps[0] if sweeps else "seed=0,1").partition("=")
    return (
        "multirun (-m) is not supported: one command makes one dataset in its own output.dir; "
        f"run one command per value, e.g. for v in {values.replace(',', ' ')}; do "
        f"diffusion-precompute ... {key.lstrip('+~')}=$v output.dir=out/{key.lstrip('+~')}-$v; "
        "done"
    )
