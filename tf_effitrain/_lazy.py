"""PEP 562 lazy attributes for the package `__init__` modules.

`import tf_effitrain` (and the command line's `--help` or a config error) must not pay
for importing TensorFlow; a public name's module is imported on first access.
"""

import importlib

__all__ = ["lazy_exports"]


def lazy_exports(package, exports):
    """`(__getattr__, __dir__)` for `package` serving `exports` lazily.

    Args:
        package: str. The package's `__name__`.
        exports: dict. Public name -> module (absolute, or relative to `package` with a
            leading dot) that defines it.
    """

    def __getattr__(name):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        globals_ = importlib.import_module(package).__dict__
        globals_[name] = value  # later lookups skip this function
        return value

    def __dir__():
        return sorted(set(exports) | set(importlib.import_module(package).__dict__))

    return __getattr__, __dir__
