"""Start-up time of the entry scripts: Lightning without two imports it never uses, and a quick exit on usage errors.

A usage error (a bad option, ``--help``) must reach the user within 5 s on 2 idle cores; most of that time is
``import lightning``. Lightning imports torchmetrics to read its version, and torchmetrics' ``__init__`` imports
every metric family eagerly (upstream: Lightning-AI/torchmetrics#3457), among them ``scipy.signal`` (only to
patch ``hamming`` onto it) and ``transformers`` (for BERTScore's ``AutoModel`` / ``AutoTokenizer``): 1.2-1.5 s
of a 5.7-5.9 s ``import lightning.pytorch`` on 2 idle cores, used by no fmprobe code path.

``import_lightning()`` imports ``lightning.pytorch`` while stand-ins for those two modules sit in
``sys.modules``; afterwards the stand-ins are removed, so the first real ``import transformers`` /
``import scipy.signal`` anywhere loads the real module. What torchmetrics kept of them stays usable: its
``AutoModel`` / ``AutoTokenizer`` names are handles that import transformers on first use, and any attribute
read from a stand-in during the import loads the real module then. Should a future Lightning or torchmetrics
fail under the stand-ins, the half-imported packages are dropped and imported again the ordinary way.
``FMPROBE_EAGER_IMPORTS=1`` turns this off.

``exit_now(code)``: the interpreter's own exit after ``import torch`` + Lightning takes ~1.1 s (tearing down
tens of thousands of objects); a command that stops before its run began has nothing to save, so it flushes its
output and leaves at once.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager

EAGER_ENV = "FMPROBE_EAGER_IMPORTS"
#: module -> {attribute: (module, attribute) it stands for}: what torchmetrics reads from each while importing.
DEFERRED: dict[str, dict[str, tuple[str, str]]] = {
    "scipy.signal": {"hamming": ("scipy.signal.windows", "hamming")},
    "transformers": {"AutoModel": ("transformers", "AutoModel"), "AutoTokenizer": ("transformers", "AutoTokenizer")},
}
#: Packages imported under the stand-ins, dropped from sys.modules to import again if that fails.
RETRIED_PACKAGES = ("lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics")


class DeferredAttribute:
    """``module.attribute``, imported on first use (a call or an attribute read)."""

    def __init__(self, module: str, attribute: str):
        self._target = (module, attribute)

    def _resolve(self):
        module, attribute = self._target
        return getattr(importlib.import_module(module), attribute)

    def __call__(self, *args, **kwargs):
        return self._resolve()(*args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._resolve(), name)

    def __repr__(self) -> str:
        return f"<deferred {'.'.join(self._target)}>"


class DeferredModule(types.ModuleType):
    """Stands in for a module while Lightning imports; reading any other attribute imports the real module."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), name)


def _stand_in(name: str) -> DeferredModule | None:
    """A stand-in for ``name``, or None when it is loaded already or not installed (nothing to defer)."""
    if name in sys.modules:
        return None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    module = DeferredModule(name)
    module.__spec__ = spec
    for attribute, target in DEFERRED[name].items():
        setattr(module, attribute, DeferredAttribute(*target))
    return module


class CompleteOnImport(importlib.abc.MetaPathFinder):
    """When the real module is imported at last, give it the attributes its stand-in had and it lacks (torchmetrics
    patches ``scipy.signal.hamming``, gone from SciPy 1.13, for its SRMR metric): the same module as eagerly."""

    def __init__(self, stand_in: DeferredModule):
        self.stand_in = stand_in

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.stand_in.__name__:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            execute, extra = spec.loader.exec_module, {
                name: value for name, value in vars(self.stand_in).items() if not name.startswith("__")}

            def exec_module(module, execute=execute):
                execute(module)
                for name, value in extra.items():
                    if not hasattr(module, name):
                        setattr(module, name, value)

            spec.loader.exec_module = exec_module
        return spec


@contextmanager
def deferred_imports() -> Iterator[list[str]]:
    """Stand-ins for ``DEFERRED``'s modules inside the block (yields their names); removed on leaving it, each
    leaving a ``CompleteOnImport`` for the module's real import."""
    placed: dict[str, DeferredModule] = {}
    for name in DEFERRED:
        module = _stand_in(name)
        if module is not None:
            placed[name] = sys.modules[name] = module
    try:
        yield list(placed)
    finally:
        for name, module in placed.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]
                sys.meta_path.insert(0, CompleteOnImport(module))


def import_lightning() -> None:
    """``import lightning.pytorch``, without the eager imports ``DEFERRED`` names (module doc)."""
    if "lightning.pytorch" in sys.modules or os.environ.get(EAGER_ENV, "") not in ("", "0"):
        importlib.import_module("lightning.pytorch")
        return
    before = set(sys.modules)
    try:
        with deferred_imports():
            importlib.import_module("lightning.pytorch")
    except Exception:  # noqa: BLE001 -- any failure under the stand-ins: the ordinary import decides
        for name in set(sys.modules) - before:
            if name.split(".")[0] in RETRIED_PACKAGES:
                del sys.modules[name]
        importlib.import_module("lightning.pytorch")


def exit_now(code: int) -> None:
    """Flush stdout and stderr and end the process with ``code`` without the interpreter's teardown."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
