"""Gathering concurrent requests into small batches (ML.NET's PredictionEnginePool).

Requests put preprocessed images on a queue; one worker takes up to
``max_batch`` of them, waiting at most ``max_wait_ms`` for more, and runs the
network once for all of them in a thread, so the event loop never blocks.
``max_batch=1`` turns batching off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from imgclf.inference.predictor import Prediction, Predictor
from imgclf.options import SERVE_MAX_BATCH, SERVE_MAX_WAIT_MS


class Batcher:
    def __init__(self, predictor: Predictor, max_batch: int = SERVE_MAX_BATCH, max_wait_ms: float = SERVE_MAX_WAIT_MS):
        self.predictor = predictor
        self.max_batch = max(1, max_batch)
        self.max_wait = max_wait_ms / 1000.0
        self.queue: asyncio.Queue = asyncio.Queue()
        self.inference = ThreadPoolExecutor(1, thread_name_prefix="imgclf-infer")
        self.task: asyncio.Task | None = None
        self.batches = 0
        self.images = 0

    async def start(self, stopping: Callable[[], bool] = lambda: False) -> None:
        """Warm up with every batch size, then serve. The engine sizes its buffers
        for each shape now (about a second), so memory does not grow under traffic.
        ``stopping``: asked between sizes, so that Ctrl-C does not wait for the warm-up."""
        height, width = self.predictor.preprocessing.shape
        loop = asyncio.get_running_loop()
        for n in range(self.max_batch, 0, -1):
            if stopping():
                break
            warm = np.zeros((n, 3, height, width), np.float32)
            await loop.run_in_executor(self.inference, self.predictor.predict_arrays, warm)
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.inference.shutdown(wait=False)

    async def predict(self, array: np.ndarray) -> Prediction:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((array, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.max_wait
            while len(items) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            batch = np.stack([a for a, _ in items])
            try:
                probs, scores = await loop.run_in_executor(self.inference, self.predictor.predict_arrays, batch)
            except Exception as e:  # the network failing must not kill the worker
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.batches += 1
            self.images += len(items)
            scores = [None] * len(items) if scores is None else scores
            for (_, fut), p, s in zip(items, probs, scores):
                if not fut.done():
                    fut.set_result(self.predictor._prediction(p, s))
