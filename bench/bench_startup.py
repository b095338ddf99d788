"""startup: how soon a usage error or ``--help`` reaches the user (issue 13: within 5 s on 2 idle cores).

Each line runs an entry script in a fresh Python process, as a user does, and times it from start to exit
against a fresh ``python -c "import lightning.pytorch"``: what any LightningCLI-based tool pays before it can
parse a Lightning option. The two alternate, each keeping its best of three. ``cli/startup.py`` says why
fmprobe can be below that floor (two of torchmetrics' eager imports deferred, no interpreter teardown after a
usage error). Agreement: the exit status and the output the user must see (one ``error:`` line; help's last
option).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from bench.common import ROOT, Result, timed_pair

QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def _command(args: list[str]):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}

    def call() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
    return call


def run(quick: bool, device: str) -> list[Result]:
    runs = tempfile.mkdtemp(prefix="fmprobe-bench-startup-")
    cases = [
        ("train.py fit: bad option value (freeze: partial:abc)",
         ["train.py", "fit", "--config", QUICKSTART, "--model.init_args.freeze", "partial:abc", "--runs_dir", runs],
         2, lambda out: [line for line in out.stderr.splitlines() if line.startswith("error:")] == [
             "error: models.classifier.ClassifierModule: freeze='partial:abc' is not a freeze policy; use 'none', "
             "'all' or 'partial:K' (freeze the stem and the first K blocks)."]),
        ("train.py fit: unknown option", ["train.py", "fit", "--config", QUICKSTART, "--no_such_option", "1"],
         2, lambda out: sum(line.startswith("error:") for line in out.stderr.splitlines()) == 1),
        ("train.py fit --help", ["train.py", "fit", "--help"], 0,
         # all of it: fit's last argument (--weights_only) closes the text although the process skips its teardown
         lambda out: "--trainer.max_epochs" in out.stdout and "--weights_only" in "".join(out.stdout.splitlines()[-12:])),
        ("probe.py: unknown option", ["probe.py", "--no_such_option", "1"], 2,
         lambda out: sum(line.startswith("error:") for line in out.stderr.splitlines()) == 1),
    ]
    if quick:
        cases = cases[:1]
    reference = _command(["-c", "import lightning.pytorch"])
    results = []
    for what, args, status, shows in cases:
        ours, ref = timed_pair(_command(args), reference, device="cpu", repeats=1 if quick else 3)
        out = ours.value
        agrees = out.returncode == status and shows(out) and "Traceback" not in out.stderr
        results.append(Result(
            "startup", what, ours.seconds, ref.seconds, ours.seconds / ref.seconds,
            "of a plain import lightning.pytorch", "< 5 s", ours.seconds < 5.0,
            f"exit {out.returncode}, the expected output" if agrees else
            f"exit {out.returncode}: {(out.stderr or out.stdout)[-300:]!r}", agrees))
    return results
