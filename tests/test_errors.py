"""pipeline/errors.py: one home for the exit codes (both command lines, their help, the job
scripts and the docs agree with it) and an error hierarchy carrying them, so that only errors
a user can act on exit 2 and a bug exits 70 with its traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fixtures.runner import run_python

from pipeline import precompute
from pipeline.encode.encoder import EncoderError
from pipeline.encode.text import TextError
from pipeline.encode.weights import WeightsError
from pipeline.errors import (
    MEANINGS,
    SIGNALLED,
    CannotStart,
    ExitCode,
    PipelineError,
    UsageError,
    describe,
)
from pipeline.precompute import JobError
from pipeline.read.source import SampleError, check_unique_ids, expand_globs, expand_urls
from pipeline.validate import CannotValidate
from pipeline.validate import cli as validate_cli
from pipeline.validate.executor import CannotStart as PoolCannotStart

ROOT = Path(__file__).resolve().parent.parent


def test_the_codes():
    assert [(c.name, int(c)) for c in ExitCode] == [
        ("OK", 0), ("FAILED", 1), ("CANNOT_START", 2), ("STOPPED", 3), ("INTERNAL", 70),
        ("INTERRUPTED", 130),
    ]  # fmt: skip
    assert SIGNALLED == 128


@pytest.mark.parametrize(
    "error, code",
    [
        (UsageError, 2), (CannotStart, 2), (JobError, 2), (CannotValidate, 2),
        (PoolCannotStart, 2), (EncoderError, 2), (WeightsError, 2), (TextError, 2),
        (SampleError, 1),
    ],
)  # fmt: skip
def test_each_error_carries_its_code(error, code):
    assert issubclass(error, PipelineError) and error.exit_code == code


def test_usage_errors_stay_value_errors():
    """Callers that catch ValueError (and diffusers-style expectations) keep working."""
    for error in (UsageError, EncoderError, WeightsError, TextError, SampleError):
        assert issubclass(error, ValueError)


def test_config_and_url_refusals_are_usage_errors(make_cfg, tmp_path):
    from pipeline.run.config import validate

    with pytest.raises(UsageError, match="config key batch_size"):
        validate(make_cfg("source.urls=/d/a.tar", "output.dir=/o", "batch_size=0"))
    with pytest.raises(UsageError, match="no shard URLs"):
        expand_urls("")
    with pytest.raises(UsageError, match="matches no file"):
        expand_globs([f"{tmp_path}/none-*.tar"])
    with pytest.raises(UsageError, match="not unique"):
        check_unique_ids(["/a/x.tar", "/b/x.tar"])
    with pytest.raises(UsageError, match="does not exist"):
        precompute.refuse_missing_shards([f"{tmp_path}/missing.tar"])


def _exit_of(fn) -> int:
    with pytest.raises(SystemExit) as info:
        fn()
    return info.value.code


@pytest.mark.parametrize(
    "raised, code, stderr",
    [
        (UsageError("config key seed: must be >= 0"), 2, "error: config key seed"),
        (JobError("output.dir=/o is not writable"), 2, "error: output.dir=/o"),
        (SampleError("bad sample in shard a.tar"), 1, "error (on_error=fail): bad sample"),
        (OSError("disk full"), 1, "error: disk full"),
        (ValueError("operands could not be broadcast"), 70, "Traceback"),
        (KeyError("shape"), 70, "internal error (a bug, exit 70)"),
    ],
)
def test_the_precompute_exits_with_the_errors_code(
    monkeypatch, make_cfg, capsys, raised, code, stderr
):
    """A bug (a bare ValueError deep in the code) is no config error: traceback, exit 70."""

    def run(cfg):
        raise raised

    monkeypatch.setattr(precompute, "run", run)
    cfg = make_cfg("source.urls=/d/a.tar", "output.dir=/o")
    assert _exit_of(lambda: precompute._job(cfg)) == code
    assert stderr in capsys.readouterr().err


@pytest.mark.parametrize(
    "raised, code, stderr",
    [
        (CannotValidate("no _manifest.json in /o"), 2, "error: no _manifest.json"),
        (ValueError("a bug"), 70, "Traceback"),
        (IndexError("a bug"), 70, "internal error (a bug"),
    ],
)
def test_the_validator_exits_with_the_errors_code(monkeypatch, capsys, raised, code, stderr):
    def run(cfg):
        raise raised

    monkeypatch.setattr(validate_cli, "run", run)
    assert validate_cli.main(["output.dir=/o"]) == code
    assert stderr in capsys.readouterr().err


def test_the_job_scripts_use_the_enum():
    """jobs/submit.sh names its codes once (EXIT_*=N, equal to ExitCode) and exits with no
    bare number; jobs/validate.sh runs it."""
    text = (ROOT / "jobs" / "submit.sh").read_text()
    assigned = dict(re.findall(r"^EXIT_([A-Z_]+)=(\d+)$", text, re.M))
    want = {c.name: str(int(c)) for c in ExitCode if c.name in assigned}
    assert assigned == {**want, "SIGNALLED": str(SIGNALLED)}
    assert set(assigned) == {"OK", "CANNOT_START", "STOPPED", "INTERRUPTED", "SIGNALLED"}
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert not re.findall(r"\bexit \d+|print\(\d+\)|\b\d+ - rc\b", code)
    assert "exec" in (ROOT / "jobs" / "validate.sh").read_text()


def _codes_in(section: str) -> set[int]:
    """The codes a docs section lists: table rows ``| N |`` or backticked ``N`` items."""
    rows = re.findall(r"^\| (\d+)(?:\+N)? \|", section, re.M)
    ticks = re.findall(r"`(\d+)`", section)
    return {int(c) for c in rows + ticks}


def _section(path: str, heading: str) -> str:
    text = (ROOT / path).read_text()
    start = text.index(heading)
    end = text.find("\n#", start + len(heading))
    return text[start : end if end > 0 else None]


@pytest.mark.parametrize(
    "path, heading, command",
    [
        ("docs/robustness.md", "## Exit codes", "precompute"),
        ("docs/validation.md", "## Exit codes", "validate"),
    ],
)
def test_the_docs_list_the_codes_of_each_command(path, heading, command):
    section = _section(path, heading).split("\n\n`jobs/")[0]
    section = section.split("The validator's are in")[0]
    assert _codes_in(section) == {int(c) for c in MEANINGS[command]}, path


def test_the_cluster_docs_list_the_scripts_codes():
    section = _section("docs/cluster.md", "## Exit codes")
    listed = _codes_in(section.split("\n\n`jobs/validate.sh`")[0])
    want = {int(c) for m in (MEANINGS["precompute"], MEANINGS["jobs"]) for c in m} | {SIGNALLED}
    assert listed == want


def test_both_helps_print_the_codes():
    for module, command in (
        ("pipeline.precompute", "precompute"),
        ("pipeline.validate", "validate"),
    ):
        res = run_python("-m", module, "--help")
        assert res.returncode == 0, res.stderr
        assert describe(command) in res.stdout, module
