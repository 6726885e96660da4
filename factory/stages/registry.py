"""Every stage by job kind, with the fingerprint of the code that runs it.

A job's key covers its params, its recipe, its dependencies' keys and this fingerprint:
the sha256 of its stage module's source and of every factory module that stage imports,
and those its helper modules in factory.stages import in turn (a package imported whole
counts with all its modules, e.g. the distro families). A
changed finalise.py, debian.py or bootloader.py gives new keys, so an upgraded factory
never reuses a tree its old code made. Modules only the controller uses (scheduler,
runner, CLI) are not part of it: they do not change what a stage makes.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import importlib.util
import pkgutil
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import ValidationError

from factory.publish import stage as upload
from factory.stages import Stage, assemble, boot, convert, finalise, one_line, pack, publish, rootfs

STAGES: dict[str, Stage] = {
    m.STAGE.kind: m.STAGE
    for m in (rootfs, finalise, assemble, convert, pack, publish, boot, upload)
}


class ParamsError(ValueError):
    """A job's params do not fit its stage: one line naming the job and the field."""


def get(kind: str) -> Stage:
    try:
        return STAGES[kind]
    except KeyError:
        raise ParamsError(f"no stage for job kind {kind!r} (valid: {', '.join(STAGES)})") from None


def _imports(module: ModuleType) -> set[str]:
    """The factory modules `module` imports directly, packages expanded to their modules."""
    source = Path(str(module.__file__)).read_text()
    found: set[str] = set()  # modules names are taken from
    whole: set[str] = set()  # modules imported as modules
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            whole.update(a.name for a in node.names if a.name.startswith("factory."))
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and node.module
            and (node.module == "factory" or node.module.startswith("factory."))
        ):
            found.add(node.module)
            parent = importlib.import_module(node.module)
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                if hasattr(parent, "__path__") and importlib.util.find_spec(name):
                    whole.add(name)
    for name in list(whole):
        mod = importlib.import_module(name)
        if hasattr(mod, "__path__"):  # a package used as a whole: all of its modules
            whole.update(f"{name}.{info.name}" for info in pkgutil.iter_modules(mod.__path__))
    return (found | whole) - {"factory"}


@functools.cache
def fingerprint(kind: str) -> str:
    """sha256 of the code that runs jobs of `kind` (see the module's docstring)."""
    h = hashlib.sha256()
    for name in code_of(kind):
        path = Path(str(importlib.import_module(name).__file__))
        h.update(f"{name}\n".encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def code_of(kind: str) -> list[str]:
    """The modules whose source the fingerprint of `kind` covers."""
    names, todo = {get(kind).module}, [get(kind).module]
    while todo:  # a stage's helpers in factory.stages (and the publish targets' modules
        # in factory.publish) are its code too: theirs count
        for name in _imports(importlib.import_module(todo.pop())) - names:
            names.add(name)
            if name.startswith(("factory.stages.", "factory.publish.")):
                todo.append(name)
    return sorted(names)


def validate(kind: str, params: Mapping[str, Any], job: str = "") -> None:
    """Raise ParamsError (one line) unless `params` fit the stage of `kind`."""
    try:
        get(kind).params.model_validate(dict(params))
    except ValidationError as exc:
        raise ParamsError(f"{job or kind}: malformed params: {one_line(exc)}") from None


def cost(kind: str, params: Mapping[str, Any]) -> float:
    return get(kind).cost(params)
