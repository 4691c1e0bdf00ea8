"""Register mergekit-awd's merge methods when mergekit's are imported.

mergekit 0.1.5 has no plugin entry point. ``mergekit_awd.pth`` imports this
module at interpreter start; it only adds an import hook (no torch, no
mergekit), which fires once, right after ``mergekit.merge_methods`` has been
imported, and registers `awd` through mergekit's public ``register``.
"""

import sys

_TARGET = "mergekit.merge_methods"


class _RegisterAfterImport:
    """A meta path finder (duck-typed: importlib.abc alone costs ~20 ms)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # fire once; find the real module below
        import importlib.util

        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            try:
                from mergekit_awd.registration import register_all

                register_all()
            except Exception as error:  # never break mergekit itself
                sys.stderr.write(
                    f"mergekit-awd: could not register the 'awd' merge method: "
                    f"{type(error).__name__}: {error}\n"
                )

        spec.loader.exec_module = exec_and_register
        return spec


def install():
    if _TARGET not in sys.modules and not any(
        isinstance(f, _RegisterAfterImport) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _RegisterAfterImport())


install()
