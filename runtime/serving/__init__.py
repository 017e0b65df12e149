"""Serving: a continuous batch with MagicDec in every round (``loop.py``), driven from asyncio by
``AsyncEngine`` (``async_engine.py``)."""

from .loop import QueueFull, ServeConfig, ServingEngine
from .request import GenerationConfig, RequestOutput, Usage

__all__ = ["GenerationConfig", "QueueFull", "RequestOutput", "ServeConfig", "ServingEngine", "Usage"]
