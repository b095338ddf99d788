"""Every wandb sweep file names arguments that train.py's parser accepts, with every value of its range."""

import contextlib
import io
from pathlib import Path

import pytest
import yaml

import train

pytestmark = pytest.mark.slow  # a fast_dev_run fit per sweep

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))


def values_of(spec: dict) -> list:
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    if "min" in spec and "max" in spec:
        return [spec["min"], spec["max"]]
    raise AssertionError(f"unsupported parameter spec {spec}")


def fixed_arguments(sweep: dict) -> list[str]:
    """The command's own arguments (after the program), without wandb's ${...} macros."""
    command = sweep["command"]
    start = command.index("${program}") + 1
    return [str(a) for a in command[start:] if not str(a).startswith("${")]


def parses(arguments: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        train.main([*arguments, "--print_config"])
    assert exit_info.value.code in (0, None), out.getvalue()
    return out.getvalue()


def test_there_are_sweeps():
    assert len(SWEEPS) >= 3


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_parameters_are_accepted_by_train_py(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    sweep = yaml.safe_load(path.read_text())
    assert sweep["program"] == "train.py"
    assert sweep["metric"]["name"] and sweep["method"] in ("grid", "random", "bayes")
    fixed = fixed_arguments(sweep)
    assert fixed[0] == "fit" and (ROOT / fixed[fixed.index("--config") + 1]).exists()
    for name, spec in sweep["parameters"].items():
        assert name.startswith(("model.", "data.", "trainer.")), name
        for value in values_of(spec):
            printed = yaml.safe_load(parses([*fixed, f"--{name}={value}"]))
            node = printed
            for part in name.split("."):
                node = node[part]
            assert str(node) == str(value), (name, value, node)
