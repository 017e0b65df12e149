"""mlc-magicdec: MagicDec speculative decoding compiled through Apache TVM."""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Engine":  # imported lazily: importing the package should not load TVM
        from .runtime.engine import Engine

        return Engine
    if name == "AsyncEngine":
        from .runtime.serving.async_engine import AsyncEngine

        return AsyncEngine
    raise AttributeError(name)
