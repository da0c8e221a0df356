"""A small generic registry: named plug-ins, or any callable given by a dotted import path.

Used for rewards, gating rules, cutoff rules and predictors, so that users can plug in their own
implementation without editing this package::

    GATES = Registry("gate")

    @GATES.register("std")
    def std_gate(...): ...

    GATES.get("std")                         # registered name
    GATES.get("my_pkg.gates:custom_gate")    # "module:attribute" (attribute may be dotted)
    GATES.get("my_pkg.gates.custom_gate")    # "module.attribute"
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any, Iterator


class RegistryError(LookupError):
    """An unknown name or an import path that cannot be resolved."""

    def __str__(self) -> str:  # LookupError/KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


def import_object(path: str) -> Any:
    """Resolve "pkg.module:attr.sub" or "pkg.module.attr" to the object it names.

    For the dotted form the longest importable module prefix wins, the rest is an attribute chain.
    Raises RegistryError when no split resolves; errors raised *inside* an imported module (other
    than it not existing) propagate unchanged so that bugs in user code stay visible.
    """
    if not isinstance(path, str) or not path.strip():
        raise RegistryError(f"not an import path: {path!r}")
    path = path.strip()
    if ":" in path:
        module_name, _, attr_path = path.partition(":")
        splits = [(module_name, attr_path)]
    else:
        parts = path.split(".")
        splits = [(".".join(parts[:i]), ".".join(parts[i:])) for i in range(len(parts) - 1, 0, -1)]
    failures = []
    for module_name, attr_path in splits:
        if not module_name or not attr_path:
            failures.append(f"{module_name!r}:{attr_path!r} (empty part)")
            continue
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only swallow "this module does not exist"; a missing dependency of an existing
            # module is a real error in that module.
            missing = exc.name or ""
            if not (module_name == missing or module_name.startswith(missing + ".")):
                raise
            failures.append(f"no module {module_name!r}")
            continue
        except (TypeError, ValueError):  # e.g. a relative name such as ".mod"
            failures.append(f"invalid module name {module_name!r}")
            continue
        try:
            for attr in attr_path.split("."):
                obj = getattr(obj, attr)
        except AttributeError:
            failures.append(f"module {module_name!r} has no attribute {attr_path!r}")
            continue
        return obj
    raise RegistryError(f"cannot import {path!r}: " + "; ".join(failures))


class Registry:
    """Maps names to objects; `get` also accepts a dotted import path for out-of-tree objects."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, name: str | None = None, obj: Any = None, *, override: bool = False):
        """Register `obj` under `name` (default: its __name__).

        Use as a decorator (`@reg.register("x")` or `@reg.register()`) or directly
        (`reg.register("x", fn)`). Re-registering a name with a different object needs override=True.
        """

        def add(target: Any) -> Any:
            key = name if name is not None else getattr(target, "__name__", None)
            if not isinstance(key, str) or not key:
                raise ValueError(f"{self.kind} registry needs a non-empty string name, got {key!r}")
            existing = self._entries.get(key)
            if existing is not None and existing is not target and not override:
                raise ValueError(f"{self.kind} {key!r} is already registered ({existing!r})")
            self._entries[key] = target
            return target

        if callable(name) and obj is None:  # bare @reg.register
            target, name = name, None
            return add(target)
        return add(obj) if obj is not None else add

    def get(self, name_or_path: str) -> Any:
        """The object registered as `name_or_path`, else the object that import path names."""
        if isinstance(name_or_path, str) and name_or_path in self._entries:
            return self._entries[name_or_path]
        if isinstance(name_or_path, str) and ("." in name_or_path or ":" in name_or_path):
            try:
                return import_object(name_or_path)
            except RegistryError as exc:
                raise RegistryError(f"{exc}. {self._known()}") from None
        raise RegistryError(f"unknown {self.kind} {name_or_path!r}{self._did_you_mean(name_or_path)}"
                            f". {self._known()}")

    def names(self) -> list[str]:
        return sorted(self._entries)

    def _did_you_mean(self, name: object) -> str:
        close = difflib.get_close_matches(str(name), self.names(), n=1)
        return f" (did you mean '{close[0]}'?)" if close else ""

    def _known(self) -> str:
        names = ", ".join(self.names()) or "(none)"
        return (f"Registered {self.kind} names: {names}; "
                "or give an import path 'pkg.module:function' / 'pkg.module.function'.")

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"

