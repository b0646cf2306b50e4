"""ich: intracranial hemorrhage detection on head CT (RSNA 2019). Research use only.

`import ich` is light: it imports neither Keras nor a backend. The Python API (ich.api, see
docs/api.md) is reached through this package, loaded on first use: `ich.load_config`,
`ich.run`, `ich.load_model`, `ich.predict`, `ich.evaluate`.

Whenever Keras gets imported after `import ich`, ich's custom layers and losses are registered
with it at once, so `keras.saving.load_model("runs/x/stage2.keras")` works with plain Keras.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

# Names served by ich.api, imported on first access (PEP 562) so `import ich` stays cheap.
API = ("load_config", "run", "run_step", "load_model", "predict", "evaluate", "Cascade")
__all__ = ["__version__", *API]


def __getattr__(name: str):
    if name in API:
        return getattr(importlib.import_module("ich.api"), name)
    raise AttributeError(f"module 'ich' has no attribute {name!r}")


def register_custom_objects() -> None:
    """Register ich's Keras custom objects (imports Keras: choose the backend first)."""
    importlib.import_module("ich.models")


class _RegisterAfterKeras(importlib.abc.MetaPathFinder):
    """Runs register_custom_objects right after Keras itself has been imported.

    Registering on `import ich` directly would import Keras then, before a notebook or the CLI
    had the chance to choose the backend; this waits for whoever imports Keras first.
    """

    def find_spec(self, fullname, path=None, target=None):
        """Wrap the loader of the top-level `keras` module; ignore every other import."""
        if fullname != "keras":
            return None
        sys.meta_path.remove(self)  # once, and let the normal finders locate keras
        spec = importlib.util.find_spec("keras")
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenRegister(spec.loader)
        return spec


class _ThenRegister(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        register_custom_objects()

    def __getattr__(self, name):  # is_package, get_code, ... of the wrapped loader
        return getattr(self.loader, name)


if "keras" in sys.modules:
    register_custom_objects()
elif not any(isinstance(finder, _RegisterAfterKeras) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterKeras())
