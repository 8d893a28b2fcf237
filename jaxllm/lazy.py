"""Lazy re-exports for package `__init__` files (PEP 562): a public name is imported from its module on first
use, so importing a package (and `jaxllm --help`) loads no JAX, Orbax or Grain until a name needs them."""
from __future__ import annotations

import importlib
from typing import Callable, Mapping, Sequence


def lazy_exports(package: str, namespace: dict, exports: Mapping[str, Sequence[str]]) -> tuple[Callable, list]:
    """(module __getattr__, __all__) for `package`, whose globals are `namespace`; exports: module -> names."""
    module_of = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str):
        module = module_of.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value          # later lookups skip __getattr__
        return value

    return __getattr__, sorted(module_of)
