"""The validator's command line: ``diffusion-validate`` / ``python -m pipeline.validate``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from omegaconf import DictConfig

from pipeline.errors import ExitCode, PipelineError, describe, internal_error
from pipeline.validate.config import register_validate_configs
from pipeline.validate.driver import run
from pipeline.validate.report import format_console


def load_config(overrides: Sequence[str] = ()) -> DictConfig:
    """conf/validate.yaml with command-line style overrides (``key=value``), typed by
    :class:`pipeline.validate.config.ValidateConfig`: an unknown key or a wrong type raises
    (Hydra's ConfigCompositionException, exit code 2 from :func:`main`)."""
    from pipeline.run.config import compose

    register_validate_configs()
    return compose(list(overrides), config_name="validate")


def run_validation(output_dir: str, *overrides: str) -> int:
    """Validate ``output_dir`` with default settings plus overrides; print; return the exit code."""
    return main([f"output.dir={output_dir}", *overrides])


def positional_dir(argv: list[str]) -> list[str]:
    """``DIR key=value ...`` -> ``output.dir=DIR key=value ...``: a first argument that is no
    option and no ``key=value`` override is the records directory, as a user types it."""
    if argv and not argv[0].startswith("-") and "=" not in argv[0]:
        if any(a.split("=", 1)[0].lstrip("+~") == "output.dir" for a in argv[1:]):
            return argv  # Hydra names the stray argument
        value = argv[0].replace("\\", "\\\\").replace("'", "\\'")
        return [f"output.dir='{value}'", *argv[1:]]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``diffusion-validate DIR [key=value ...]`` (or ``output.dir=DIR``); returns the exit
    code."""
    argv = positional_dir(list(sys.argv[1:] if argv is None else argv))
    if any(a in ("-h", "--help") for a in argv):
        from pipeline import validate
        from pipeline.run.config import CONF_DIR

        print(validate.__doc__.split("\n\n")[0] + "\n\n" + describe("validate"))
        print("\nKeys, set as key=value (conf/validate.yaml):\n")
        print((CONF_DIR / "validate.yaml").read_text())
        return ExitCode.OK
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = load_config(argv)
        report = run(cfg)
    except PipelineError as exc:  # CannotValidate: what to fix
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (HydraException, OmegaConfBaseException) as exc:  # override errors, unknown keys
        from pipeline.run.config import config_error_message

        print(f"error: {config_error_message(exc)}", file=sys.stderr)
        return ExitCode.CANNOT_START
    except Exception:  # a bug: never reported as a config error
        return internal_error()
    print(format_console(report))
    return report["exit_code"]
