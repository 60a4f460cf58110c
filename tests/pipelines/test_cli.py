"""The command line: every stage's help, --set after the stage name, and one exit code per class of failure,
each shown through the real `twinv2` executable (a subprocess) with a one-paragraph message."""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipelines.cli import MODELS, build_parser, main
from twinv2.errors import (EXIT_ARTIFACT, EXIT_DATA, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OS, EXIT_USAGE,
                           EXIT_VALIDATION_FAILED)

REPO = Path(__file__).resolve().parents[2]
STAGES = ("generate", "ingest", "validate", "cluster", "train", "evaluate", "register")


def _exe() -> list[str]:
    exe = Path(sys.executable).parent / "twinv2"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "pipelines.cli"]


def twinv2(*args: str, env: dict | None = None, preexec_fn=None, prefix: list[str] | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess:
    e = {**os.environ, "GX_ANALYTICS_ENABLED": "False", **(env or {})}
    e.pop("TWINV2_DEBUG", None) if not (env and "TWINV2_DEBUG" in env) else None
    return subprocess.run([*(prefix or []), *_exe(), *args], capture_output=True, text=True, env=e, cwd=REPO,
                          preexec_fn=preexec_fn, timeout=timeout)


def _one_paragraph(r: subprocess.CompletedProcess, *names: str) -> str:
    err = r.stderr.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    for n in names:
        assert n in last, (n, err)
    return last


# ---------------------------------------------------------------- help


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_help_names_its_arguments_choices_and_defaults(stage):
    sp = _subparsers(build_parser())[stage]
    text = sp.format_help()
    for a in sp._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        assert a.help, (stage, a.option_strings)
        for opt in a.option_strings:
            assert opt in text, (stage, opt)
        for c in a.choices or []:
            assert c in " ".join(text.split()), (stage, opt, c)
        # a required argument says so, every other one says what happens without it
        assert ("(required" in a.help) if a.required else ("default" in a.help), (stage, a.option_strings, a.help)
    assert "--set" in text and "--params" in text and "exit codes" in text


def test_train_help_through_the_executable_lists_every_model():
    r = twinv2("train", "--help")
    assert r.returncode == 0, r.stderr
    flat = " ".join(r.stdout.split())
    for opt in ("--data", "--model", "--out", "--resume", "--warm-start"):
        assert opt in flat
    for m in MODELS:
        assert m in flat


def test_model_choices_are_the_trainable_models():
    import twinv2.models as M

    assert set(M.MODEL_NAMES) <= set(MODELS)
    assert set(MODELS) == set(getattr(M, "TRAINABLE", M.MODEL_NAMES))


def test_set_is_accepted_after_the_stage_name(monkeypatch, tmp_path):
    from pipelines import validate

    seen = {}
    monkeypatch.setattr(validate, "run", lambda data, params: seen.update(params=params) or {"summary": "ok"})
    assert main(["--set", "train.lr=1e-3", "validate", "--data", str(tmp_path), "--set", "train.epochs=7"]) == 0
    assert seen["params"]["train"]["lr"] == 0.001 and seen["params"]["train"]["epochs"] == 7
    assert main(["--set", "train.lr=0.5", "validate", "--data", str(tmp_path),
                 "--set", "validate.batch_rows=123", "--set", "validate.gx_confirm=false"]) == 0
    p = seen["params"]
    assert p["validate"]["batch_rows"] == 123 and p["validate"]["gx_confirm"] is False and p["train"]["lr"] == 0.5
    params_file = tmp_path / "p.yaml"
    params_file.write_text((REPO / "params.yaml").read_text().replace("epochs: 4", "epochs: 9"))
    assert main(["validate", "--data", str(tmp_path), "--params", str(params_file)]) == 0
    assert seen["params"]["train"]["epochs"] == 9


# ---------------------------------------------------------------- exit codes, one class each


@pytest.mark.parametrize("args, names", [
    (["--set", "train=5", "validate", "--data", "D"], ["--set train=5", "section", "train.", "error"]),
    (["validate", "--data", "D", "--set", "train=5"], ["--set train=5", "section"]),
    (["validate", "--data", "D", "--set", "train.lr=fast"], ["train.lr", "number"]),
    (["validate", "--data", "D", "--set", "train.lr.x=1"], ["train.lr", "not a section"]),
    (["validate", "--data", "D", "--set", "nosuch.key=1"], ["'nosuch'", "not a section"]),
    (["validate", "--data", "D", "--set", "train.lr"], ["KEY=VALUE"]),
    (["--params", "/etc/passwd", "validate", "--data", "D"], ["/etc/passwd", "not a params file"]),
    (["--params", "/nonexistent/params.yaml", "validate", "--data", "D"], ["/nonexistent/params.yaml", "no such"]),
    (["train", "--data", "D", "--model", "nosuch", "--out", "R"], ["usage error", "--model", "twinv2"]),
    (["validate"], ["usage error", "--data"]),
])
def test_usage_and_configuration_errors_exit_3(args, names):
    r = twinv2(*args)
    assert r.returncode == EXIT_USAGE, r.stderr
    _one_paragraph(r, *names)


@pytest.mark.parametrize("pair, names", [
    ("train.learnig_rate=0.01", ["'learnig_rate' is not a key of train", "gbdt.learning_rate", "lr, num_workers"]),
    ("train.epoch=3", ["'epoch' is not a key of train", "did you mean train.epochs?"]),
    ("model.topkk=10", ["did you mean model.topk?"]),
    ("train.epochs=0", ["train.epochs=0", "greater than or equal to 1"]),
    ("train.lr=-0.01", ["train.lr=-0.01", "greater than 0"]),
    ("train.batch_size=0", ["train.batch_size=0", "greater than or equal to 1"]),
    ("train.optimizer=sgd", ["train.optimizer='sgd'", "adam"]),
    ("cluster.exponent=1.5", ["cluster.exponent=1.5", "less than or equal to 1"]),
    ("ingest.history_frac=0.9", ["history_frac + valid_frac + test_frac = 1.1", "< 1"]),
])
def test_set_refuses_unknown_keys_and_impossible_values(pair, names, monkeypatch, tmp_path, capsys):
    """A typo of a key in a known section and a value no stage can run with are usage errors (exit 3) naming
    the key (and the keys it may be, or the range it must be in); the stage never runs."""
    from pipelines import validate

    ran = []
    monkeypatch.setattr(validate, "run", lambda data, params: ran.append(1) or {"summary": "ok"})
    assert main(["validate", "--data", str(tmp_path), "--set", pair]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert not ran and err.count("\n") == 1, err
    for n in names:
        assert n in err, (n, err)


def test_set_accepts_the_optional_and_free_form_keys(monkeypatch, tmp_path):
    """Keys the stages read that params.yaml does not list (OPTIONAL_KEYS), keys inside free-form mappings
    (generate.knobs, benchmark.variants) and keys of the repository's params.yaml missing from an older
    --params file are accepted, and every possible value passes."""
    from pipelines import validate

    seen = {}
    monkeypatch.setattr(validate, "run", lambda data, params: seen.update(params=params) or {"summary": "ok"})
    ok = ["cluster.embeddings=runs/x", "train.features.pop_log2_max=12", "generate.knobs.dormant_weight=3.0",
          "benchmark.variants.trained_emb={cluster.embeddings: runs/x}", "train.epochs=1", "train.bias_lr=null",
          "train.prefetch=0", "train.fast_batches=false", "train.compile=true"]
    assert main(["validate", "--data", str(tmp_path)] + [a for k in ok for a in ("--set", k)]) == 0
    assert seen["params"]["cluster"]["embeddings"] == "runs/x"
    assert seen["params"]["generate"]["knobs"] == {"dormant_weight": 3.0}
    assert (seen["params"]["train"]["prefetch"], seen["params"]["train"]["fast_batches"]) == (0, False)
    older = tmp_path / "p.yaml"                      # an older copy without train.user_bias_lr
    older.write_text((REPO / "params.yaml").read_text().replace("  user_bias_lr: 0.01", "  # gone"))
    assert main(["validate", "--data", str(tmp_path), "--params", str(older), "--set", "train.user_bias_lr=0.02"]) == 0
    assert seen["params"]["train"]["user_bias_lr"] == 0.02


def test_the_repository_params_pass_the_value_checks(params):
    from pipelines.settings import check_values

    assert check_values(params) is params


def test_unreadable_input_exits_2(tmp_path):
    r = twinv2("validate", "--data", str(tmp_path / "nosuch"))
    assert r.returncode == EXIT_DATA, r.stderr
    last = _one_paragraph(r, "nosuch/raw", "expected")
    assert last.startswith("twinv2 validate: data error: "), last       # the class of exit code 2, not "error"


def test_each_error_line_names_the_class_of_its_exit_code():
    """`twinv2 <stage>: <class>: ...` (README "Exit codes"): the label follows the exit code, one per class."""
    from twinv2.errors import ArtifactError, ConfigError, DataError, describe

    cases = [(ConfigError("c"), EXIT_USAGE, "configuration error"), (DataError("d"), EXIT_DATA, "data error"),
             (ValueError("v"), EXIT_DATA, "data error"), (FileNotFoundError(2, "gone", "f"), EXIT_DATA, "data error"),
             (ArtifactError("a"), EXIT_ARTIFACT, "artifact error"), (PermissionError(13, "no", "f"), EXIT_OS,
             "system error"), (MemoryError(), EXIT_OS, "system error"), (RuntimeError("r"), EXIT_INTERNAL,
             "internal error"), (KeyboardInterrupt(), EXIT_INTERRUPTED, "interrupted")]
    for exc, code, label in cases:
        assert describe(exc)[:2] == (code, label), exc
    r = twinv2("validate", "--data", "D", "--set", "train.lr=fast")
    assert _one_paragraph(r).startswith("twinv2 validate: configuration error: "), r.stderr


def test_validation_failure_exits_1(tmp_path):
    from tests.validation.corpus import clean_world, write_world

    w = clean_world()
    w.impressions = w.impressions.iloc[:0]
    write_world(w, tmp_path)
    r = twinv2("validate", "--data", str(tmp_path), "--set", "validate.gx_confirm=false")
    assert r.returncode == EXIT_VALIDATION_FAILED, r.stderr
    _one_paragraph(r, "FAILED", "impressions.not_empty")


def _validated_stub(root: Path) -> None:
    (root / "validated" / "behaviors").mkdir(parents=True)
    (root / "validated" / "behaviors" / "part-00000.parquet").write_bytes(b"x")
    (root / "validated" / "meta.json").write_text('{"history_end_ms": 1000}')


@pytest.mark.parametrize("content", [os.urandom(2048), b"not a checkpoint\n", b""], ids=["random", "text", "empty"])
def test_a_pt_that_is_not_a_checkpoint_exits_4(tmp_path, content):
    _validated_stub(tmp_path / "d")
    run = tmp_path / "run"
    run.mkdir()
    (run / "vocab.npz").write_bytes(b"")
    (run / "model.pt").write_bytes(content)
    r = twinv2("cluster", "--data", str(tmp_path / "d"), "--embeddings", str(run / "model.pt"))
    assert r.returncode == EXIT_ARTIFACT, r.stderr
    _one_paragraph(r, "model.pt", "checkpoint")


def _fsize_limit():
    resource.setrlimit(resource.RLIMIT_FSIZE, (16_384, 16_384))   # a full disk, as the writes see it


def test_disk_full_exits_5_and_publishes_nothing(tmp_path):
    out = tmp_path / "world"
    r = twinv2("generate", "--preset", "tiny", "--out", str(out), preexec_fn=_fsize_limit)
    assert r.returncode == EXIT_OS, r.stderr
    _one_paragraph(r, "system error", "File too large", "--out", "full")
    assert not (out / "raw").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")] if out.exists() else True


def test_read_only_output_exits_5(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        prefix = None
    else:                                 # root ignores permissions: a read-only bind mount in a mount namespace
        if not shutil.which("unshare"):
            pytest.skip("root without unshare: cannot make a read-only directory")
        probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
        if probe.returncode != 0:
            pytest.skip(f"root without mount namespaces: {probe.stderr.decode()[:100]}")
        cmd = (f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && exec \"$@\"")
        prefix = ["unshare", "-m", "--propagation", "private", "sh", "-c", cmd, "sh"]
    r = twinv2("generate", "--preset", "tiny", "--out", str(ro / "world"), prefix=prefix)
    assert r.returncode == EXIT_OS, r.stderr
    _one_paragraph(r, "system error", str(ro / "world"), "not writable")


_PATCHED = textwrap.dedent("""
    import os, signal, sys
    signal.signal(signal.SIGINT, signal.default_int_handler)   # as in a terminal, even when pytest runs under nohup
    from pipelines import cli, validate
    def boom(data, params):
        if sys.argv[1] == "bug":
            return {}["no such key"]
        os.kill(os.getpid(), signal.SIGINT)
    validate.run = boom
    sys.exit(cli.main(["validate", "--data", "D"]))
""")


@pytest.mark.parametrize("what, code, names", [("bug", EXIT_INTERNAL, ["internal error", "TWINV2_DEBUG=1"]),
                                               ("interrupt", EXIT_INTERRUPTED, ["interrupted"])])
def test_internal_error_and_interrupt(what, code, names):
    r = subprocess.run([sys.executable, "-c", _PATCHED, what], capture_output=True, text=True, cwd=REPO,
                       env={k: v for k, v in os.environ.items() if k != "TWINV2_DEBUG"})
    assert r.returncode == code, r.stderr
    _one_paragraph(r, *names)


def test_twinv2_debug_adds_the_traceback():
    r = twinv2("validate", "--data", "D", "--set", "train=5", env={"TWINV2_DEBUG": "1"})
    assert r.returncode == EXIT_USAGE
    assert "Traceback" in r.stderr and "ConfigError" in r.stderr


def test_a_partial_params_file_is_a_usage_error(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("train:\n  lr: 0.1\n")
    r = twinv2("--params", str(f), "validate", "--data", "D")
    assert r.returncode == EXIT_USAGE, r.stderr
    _one_paragraph(r, str(f), "lacks the sections", "validate")


def test_reports_show_paths_inside_the_repository_relative(tmp_path):
    """A published report's command line names repository files as a reader has them, not the author's
    absolute checkout path; paths outside the repository and every other argument stay as given."""
    from pathlib import Path

    from pipelines.benchmark import shown_command
    root = Path(__file__).resolve().parent.parent.parent
    argv = ["benchmark", "--data", str(tmp_path / "D"), "--publish", str(root / "docs" / "results.md"),
            f"--adopt={root / 'docs' / 'results_files' / 'results.json'}", "--set", "a=/x", "docs/rel.md"]
    assert shown_command(argv) == (f"benchmark --data {tmp_path / 'D'} --publish docs/results.md "
                                   "--adopt=docs/results_files/results.json --set a=/x docs/rel.md")
