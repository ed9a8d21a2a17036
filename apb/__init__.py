"""apb: distributed long-context prefill (APB, Spava, Star, ring, Ulysses) over Hugging Face models.

``apb.Engine`` is the batch-document API (:mod:`apb.engine`); it is imported on first use so
that ``import apb`` stays light.
"""

__version__ = "0.1.0"
__all__ = ["Engine", "__version__"]


def __getattr__(name):
    if name == "Engine":
        from apb.engine import Engine  # lazily: `import apb` must not load torch

        return Engine
    raise AttributeError(f"module 'apb' has no attribute {name!r}")
