"""Every user error as one line on stderr: ``error: <what is wrong, naming the option or file, what to do>``.

``run(main)`` wraps an entry script's ``main(argv)``. Exit status 2 for usage errors (a bad option, config file
or data location: found before the run starts), 1 for failures while running (an unreadable image, a full disk,
a non-finite loss). No traceback, unless ``--debug`` is on the command line or ``FMPROBE_DEBUG=1`` is set; an
error that is not the user's (a bug) keeps its traceback. jsonargparse reports a bad class argument as a wall
of "Does not validate against any of the Union subtypes"; the line printed is the constructor's own message.

Config files named by ``--config`` are read here first (existence, UTF-8, YAML syntax), before any heavy
library is imported, so a typo in one is reported naming the file, line and column within a second.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from cli.startup import exit_now

USAGE, FAILURE, INTERRUPTED = 2, 1, 130
DEBUG_FLAG = "--debug"
DEBUG_ENV = "FMPROBE_DEBUG"
UNION_WALL = "Does not validate against any of the Union subtypes"
#: Set on an exception: "run" when raised while the run itself was going (exit status 1, not 2), "setup" when
#: raised before it began (parsing, checks, building the classes).
PHASE_ATTR = "fmprobe_phase"

#: Errors that are the user's to fix, by class name (their modules are too heavy to import here).
USER_ERROR_NAMES = {"ArgumentError", "YAMLError", "BadImageError", "WeightsLoadError", "PretrainedWeightsUnavailable",
                    "GeometryBudgetError", "MisconfigurationException", "NonFiniteError", "NonFiniteEmbeddingError"}
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class UsageError(ValueError):
    """A command that must be changed before it can run (e.g. a run name already used, an unwritable folder)."""


_debug_run = False  # set by run() for the command it runs (--debug), read by the parser's error handler


def debug_requested(argv: Sequence[str] = ()) -> bool:
    return _debug_run or DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def mark_run_phase(error: BaseException) -> None:
    """Record that ``error`` happened while the run was going (so it exits 1, a run-time failure)."""
    try:
        setattr(error, PHASE_ATTR, "run")
    except AttributeError:  # a few built-in exceptions take no attributes
        pass


@contextmanager
def setup_phase():
    """Mark what escapes the block (errors, ``--help``'s exit) as raised before the run began, unless already marked:
    from the command line, ``run`` then ends the process without the interpreter's slow teardown."""
    try:
        yield
    except BaseException as error:
        if getattr(error, PHASE_ATTR, None) is None:
            try:
                setattr(error, PHASE_ATTR, "setup")
            except AttributeError:
                pass
        raise


def attach_path(error: BaseException, path) -> None:
    """Name ``path`` in an OSError that names no file (a write to a full disk reports only ``Errno 28``)."""
    if isinstance(error, OSError) and not error.filename:
        error.filename = str(path)


@contextmanager
def naming_path(path):
    """Around a write: an OSError raised inside names ``path``."""
    try:
        yield
    except OSError as error:
        attach_path(error, path)
        raise


def is_user_error(error: BaseException) -> bool:
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError | NotADirectoryError |
                                                      IsADirectoryError):
        return error.errno in DISK_ERRNOS
    if isinstance(error, ValueError | FloatingPointError | FileNotFoundError | NotADirectoryError |
                  IsADirectoryError):
        return True
    return bool({cls.__name__ for cls in type(error).__mro__} & USER_ERROR_NAMES)


def _raised_in(error: BaseException, library: str) -> bool:
    frame, last = error.__traceback__, None
    while frame is not None:
        last, frame = frame, frame.tb_next
    return last is not None and f"{os.sep}{library}{os.sep}" in last.tb_frame.f_code.co_filename


def innermost(error: BaseException) -> BaseException:
    """The error a user can act on: below jsonargparse's wrappers, the one the constructor raised."""
    seen: set[int] = set()
    while error.__cause__ is not None and id(error) not in seen:
        seen.add(id(error))
        if UNION_WALL in str(error) or _raised_in(error, "jsonargparse"):
            error = error.__cause__
        else:
            break
    return error


def _class_path_of(error: BaseException) -> str | None:
    """The class whose arguments were refused, from jsonargparse's 'Given value: Namespace(class_path=...)'."""
    while error is not None:
        found = re.search(r"class_path='([\w.]+)'", str(error))
        if found:
            return found.group(1)
        error = error.__cause__
    return None


def _squash(text: str) -> str:
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def message_line(error: BaseException) -> str:
    """``error`` as one line of text (without the ``error:`` prefix)."""
    text = str(error).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: its last line is the error itself
        text = text.splitlines()[-1].split(": ", 1)[-1]
    if UNION_WALL in text:  # no constructor error below it: the first listed reason
        reasons = [line.strip()[2:] for line in text.splitlines() if line.strip().startswith("- ")]
        text = reasons[0] if reasons else text.split("\n")[0]
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        where = error.filename or "the output folder"
        return (f"no space left on the device while writing {where}; free some space, or write elsewhere "
                "(--runs_dir, --cache_dir)")
    if isinstance(error, OSError) and error.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and error.filename:
        return f"cannot write {error.filename}: {error.strerror}; choose a writable folder (--runs_dir, --cache_dir)"
    if isinstance(error, FileNotFoundError) and error.filename and text.startswith("[Errno"):
        return f"file or folder not found: {error.filename}"
    if isinstance(error, UnicodeDecodeError):
        return f"a file that should be text is not UTF-8 ({error.reason} at byte {error.start})"
    return _squash(text) or type(error).__name__


def describe(error: BaseException) -> str:
    """One line for ``error``: the innermost constructor error, prefixed with the class it belongs to."""
    inner = innermost(error)
    line = message_line(inner)
    if inner is not error:
        owner = _class_path_of(error)
        if owner and owner.rsplit(".", 1)[-1] not in line:
            line = f"{owner}: {line}"
    return line


#: Lines of a jsonargparse message that only give its structure, never the reason.
_STRUCTURE = ("Subtypes:", "Errors:", "Given value", UNION_WALL, "Subclass types expect", "- a class path",
              "- a dict", "- Not a valid subclass", "- Expected a <class 'NoneType'>", "Problem with given class_path")


def condense_parser_message(message: str, cause: BaseException | None = None) -> str:
    """jsonargparse's (often many-line, nested) parse error as one line: the deepest reason, with the full key
    it belongs to (``--trainer.callbacks.settings.knn_ks``) and the class whose argument it is."""
    if cause is not None:
        inner = innermost(cause)
        if inner is not cause and is_user_error(inner) and not _raised_in(inner, "jsonargparse"):
            return describe(cause)  # e.g. a link's compute function refusing a value
    lines = [(len(line) - len(line.lstrip()), line.strip()) for line in message.splitlines() if line.strip()]
    if not lines:
        return message
    reasons = [(indent, i) for i, (indent, text) in enumerate(lines) if not text.startswith(_STRUCTURE)
               and not text.startswith("Parser key")]
    if not reasons:
        return _squash(message)
    depth = max(indent for indent, _ in reasons)
    at = next(i for indent, i in reasons if indent == depth)
    reason = lines[at][1].removeprefix("- ")
    keys, owner, level = [], None, depth
    for indent, text in reversed(lines[:at]):  # the enclosing keys and class, innermost first
        if indent >= level:
            continue
        level = indent
        key = re.match(r'Parser key "([^"]+)"', text)
        if key:
            keys.insert(0, key.group(1))
        found = re.match(r"- Problem with given class_path '([^']+)'", text)
        if found and owner is None:
            owner = found.group(1)
    given = next((text.split(":", 1)[1].strip() for indent, text in lines
                  if text.startswith("Given value:") and indent <= lines[0][0] + 2), None)
    if given and "Got value" not in reason and not given.startswith(("NestedArg", "Namespace")):
        reason += f", got {given}"
    line = f"--{'.'.join(keys)}: {reason}" if keys else reason
    return f"{line} ({owner})" if owner else line


class OneLineParserErrors:
    """Mixin for a jsonargparse parser class: a bad option is one ``error:`` line, exit 2 (all of it with
    ``--debug``). Use as ``class Parser(OneLineParserErrors, ArgumentParser)``."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or debug_requested():
            return super().error(message, ex)
        sys.stderr.write(f"error: {condense_parser_message(message, ex)} (see --help)\n")
        self.exit(USAGE)


# -- config files, before anything heavy is imported -------------------------------------------------
def config_paths(argv: Sequence[str]) -> list[str]:
    """The values given to ``--config`` / ``-c`` on the command line."""
    found = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif arg.startswith("--config="):
            found.append(arg.split("=", 1)[1])
    return found


def check_config_file(value: str) -> None:
    """A config file that does not exist, is not text or is not valid YAML: a UsageError naming it."""
    path = Path(value)
    looks_like_a_file = path.suffix.lower() in (".yaml", ".yml", ".json") or path.exists()
    if not looks_like_a_file:
        return  # jsonargparse also takes an inline YAML string here
    if not path.is_file():
        raise UsageError(f"config file {value} does not exist" if not path.exists() else
                         f"config file {value} is not a file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(f"config file {value} is not UTF-8 text (byte {error.start}: {error.reason}); "
                         "is it a binary file?") from None
    import yaml

    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or _squash(str(error))
        raise UsageError(f"config file {value} is not valid YAML{where}: {problem}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise UsageError(f"config file {value} must hold a mapping of options (key: value), "
                         f"got a {type(loaded).__name__}")


def run_preflight(argv: Sequence[str], requires: Sequence[str] = ("lightning", "yaml")) -> None:
    """The checks that need no heavy import: the project's libraries are installed in this Python (the usual
    slip: ``.venv`` not activated), and the config files; exits with one line when one fails."""
    import importlib.util

    missing = [name for name in requires if importlib.util.find_spec(name) is None]
    if missing:
        print(f"error: {', '.join(missing)} not installed for {sys.executable}; activate the project's environment "
              "(source .venv/bin/activate; `make install` creates it) or run .venv/bin/python", file=sys.stderr)
        sys.exit(FAILURE)
    if debug_requested(argv):
        return
    try:
        for value in config_paths(argv):
            check_config_file(value)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USAGE)


def run(main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> NoReturn:
    """Run ``main(argv)`` and exit: 0, or one ``error:`` line and status 2 (usage) / 1 (run-time failure)."""
    global _debug_run
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_run = debug_requested(argv)
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    if from_command_line:  # LightningCLI warns when given args that differ from sys.argv
        sys.argv[1:] = argv
    try:
        for value in config_paths(argv):
            check_config_file(value)
        main(None if from_command_line else argv)
    except SystemExit as stop:
        if from_command_line and getattr(stop, PHASE_ATTR, None) == "setup" and isinstance(stop.code, int | None):
            exit_now(stop.code or 0)  # e.g. --help or a parser error: nothing to save
        raise
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED)
    except BaseException as error:  # noqa: BLE001 -- the one place that turns errors into exit codes
        if debug or not is_user_error(innermost(error)):
            raise
        print(f"error: {describe(error)}", file=sys.stderr)
        if from_command_line and getattr(error, PHASE_ATTR, None) == "setup":
            exit_now(USAGE)
        sys.exit(FAILURE if getattr(error, PHASE_ATTR, None) == "run" else USAGE)
    finally:
        _debug_run = False
    sys.exit(0)
