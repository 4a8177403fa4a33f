"""What every request shares: one :class:`ServeState` per app, on ``app.state.serve``.

``create_app`` fills in the model and the limits; the lifespan starts the
batching queue, the decode threads and the cap on waiting images, and stops
them. Routes reach it through the :func:`get_state` dependency.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import Request

from imgclf.inference.predictor import Predictor
from imgclf.serve.batching import Batcher
from imgclf.serve.limits import BodyBudget, DecodeBudget


@dataclass
class ServeState:
    """The loaded model, the options ``create_app`` checked, the memory budgets, and
    (while the app runs) the objects its lifespan started."""

    predictor: Predictor
    name: str  # the model's name in answers: its file name, or its architecture
    max_batch: int
    max_wait_ms: float
    decode_threads: int
    max_request_bytes: int
    max_pixels: int
    max_files: int
    read_timeout: float
    api_key: str | None
    decode_budget: DecodeBudget
    bodies: BodyBudget
    batcher: Batcher | None = None
    decode_pool: ThreadPoolExecutor | None = None
    pending: asyncio.Semaphore | None = None  # images decoded and waiting for the network
    stopping: Callable[[], bool] = lambda: False  # the server was asked to stop (Ctrl-C during the warm-up)


def get_state(request: Request) -> ServeState:
    """The app's shared state (a dependency of every route that needs it)."""
    return request.app.state.serve
