"""cli/startup.py: Lightning imported without torchmetrics' unused eager imports, everything still usable after,
the ordinary import when the stand-ins fail, and a usage error's exit without the interpreter's teardown."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **env})


@pytest.mark.slow
def test_lightning_without_the_deferred_modules_and_both_usable_after():
    result = _python("""
        import sys
        from cli.startup import import_lightning
        import_lightning()
        import lightning.pytorch, torchmetrics
        deferred = [name for name in ("scipy.signal", "transformers") if name in sys.modules]
        print("loaded after import:", deferred)
        from torchmetrics.functional.text import bert
        import scipy.signal, transformers
        assert type(scipy.signal).__name__ == "module" and callable(scipy.signal.windows.hamming)
        assert type(transformers).__name__ != "DeferredModule" and hasattr(transformers, "__version__")
        # what torchmetrics kept resolves to the real classes on use
        assert bert.AutoModel.from_pretrained.__self__ is transformers.AutoModel, bert.AutoModel
        assert float(scipy.signal.hamming(4)[0]) == float(scipy.signal.windows.hamming(4)[0])
        print("ok")
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded after import: []" in result.stdout and result.stdout.rstrip().endswith("ok")


@pytest.mark.slow
def test_a_failure_under_the_stand_ins_falls_back_to_the_ordinary_import():
    result = _python("""
        import contextlib, sys, types
        import cli.startup as startup

        @contextlib.contextmanager
        def broken():  # a stand-in that Lightning cannot import through (an empty torchmetrics)
            sys.modules["torchmetrics"] = types.ModuleType("torchmetrics")
            yield ["torchmetrics"]

        startup.deferred_imports = broken
        startup.import_lightning()
        import torchmetrics, lightning.pytorch
        assert hasattr(torchmetrics, "Metric") and hasattr(lightning.pytorch, "Trainer")
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_eager_imports_on_request(monkeypatch):
    import cli.startup as startup

    imported = []
    monkeypatch.setenv("FMPROBE_EAGER_IMPORTS", "1")
    monkeypatch.delitem(sys.modules, "lightning.pytorch", raising=False)  # as in a fresh process (restored after)
    monkeypatch.setattr(startup, "deferred_imports", lambda: pytest.fail("stand-ins used although eager"))
    monkeypatch.setattr(startup.importlib, "import_module", imported.append)
    startup.import_lightning()
    assert imported == ["lightning.pytorch"]
    monkeypatch.setenv("FMPROBE_EAGER_IMPORTS", "0")
    monkeypatch.setattr(startup, "deferred_imports", lambda: pytest.fail("deferred, as it should be"))
    with pytest.raises(pytest.fail.Exception, match="deferred, as it should be"):
        startup.import_lightning()


@pytest.mark.slow
def test_usage_errors_and_help_exit_at_once_with_all_their_output(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    config = str(ROOT / "configs" / "quickstart.yaml")
    bad = subprocess.run([sys.executable, "train.py", "fit", "--config", config, "--model.init_args.freeze",
                          "partial:abc", "--runs_dir", str(tmp_path / "runs")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and not (tmp_path / "runs").exists(), bad.stderr[-2000:]
    assert bad.stderr.splitlines() == [  # the one line alone (Lightning's "Seed set to 0" waits for the run)
        "error: models.classifier.ClassifierModule: freeze='partial:abc' is not a freeze policy; use 'none', 'all' "
        "or 'partial:K' (freeze the stem and the first K blocks)."]
    # piped output is block-buffered: the help must still arrive whole although the process skips its teardown
    shown = subprocess.run([sys.executable, "train.py", "fit", "--help"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert shown.returncode == 0 and "--trainer.max_epochs" in shown.stdout
    assert "--weights_only" in "".join(shown.stdout.splitlines()[-12:]), shown.stdout[-500:]


def test_exit_now_is_used_only_for_errors_before_the_run(monkeypatch, capsys):
    from cli import errors

    exits = []
    monkeypatch.setattr(errors, "exit_now", lambda code: exits.append(code) or sys.exit(code))

    def fails_in_setup(argv):
        with errors.setup_phase():
            raise errors.UsageError("--runs_dir: not a folder")

    def fails_in_run(argv):
        with errors.setup_phase():
            error = errors.UsageError("disk full")
            errors.mark_run_phase(error)
            raise error

    monkeypatch.setattr(sys, "argv", ["train.py"])
    for main, expected in ((fails_in_setup, [2]), (fails_in_run, [])):
        exits.clear()
        with pytest.raises(SystemExit):
            errors.run(main)
        assert exits == expected, main.__name__
    with pytest.raises(SystemExit):  # in-process callers (tests) pass argv: never the quick exit
        errors.run(fails_in_setup, ["fit"])
    assert exits == [] and capsys.readouterr().err.count("error:") == 3
