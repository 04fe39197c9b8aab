"""PrefillWorker: the prefill role's worker (engine/worker_api.py `Worker`), hosted by the
worker actor (cluster/worker_actor.py). An asyncio front of PrefillCore; it only delegates.

`prefill(task)` queues the task and resolves when its first token is sampled and its K/V have
landed on the decode worker. A background loop drains the queue in batches (token budget),
running each batch's forward on the executor thread. `stop()` ends the loop, closes the core's
transfer endpoints on that thread (after any batch still running) and ends the thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from encode_workers.inproc import InProcessEncoder
from encode_workers.transfer import EncodeShard
from engine.errors import WorkerBroken, WorkerLoopDied
from engine.kv_cache import CacheEvents
from engine.llm_engine import LoadedModel
from engine.tensor_parallel import TPGroup
from engine.worker_api import Role, WorkerReady, WorkerStatus, worker_info
from kv_transfer.layout import TransferDescriptor
from prefill_workers.prefill_core import PrefillCore, PrefillOptions, PrefillResult, PrefillTask

log = logging.getLogger(__name__)


class PrefillWorker:
    def __init__(
        self,
        worker_id: str,
        options: PrefillOptions,
        loaded: LoadedModel,
        image_encoder: InProcessEncoder | None = None,
        tp: TPGroup | None = None,
    ) -> None:
        """loaded / image_encoder: weights already in this process (a role switch reuses them); without
        image_encoder the vision side is loaded when options ask for in-process encoding. tp: the
        tensor-parallel group this worker drives (PrefillCore)."""
        self.worker_id = worker_id
        self.info = worker_info(worker_id, Role.PREFILL)
        self.core = PrefillCore(options, loaded, image_encoder, tp=tp)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefill-core")
        self._futures: dict[str, asyncio.Future] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._busy = 0
        self.failed: str | None = None  # why the batch loop died; then every call raises WorkerLoopDied

    def _check(self) -> None:
        if self.failed is not None:
            raise WorkerLoopDied(self.failed)

    async def ready(self) -> WorkerReady:
        self._check()
        return WorkerReady(self.info, self.core.layout)

    async def prepare_images(self, shards: list[EncodeShard]) -> list[TransferDescriptor]:
        self._check()
        # On the core's thread: the receiver is not shared with a running batch's receives.
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.core.prepare_images, shards)

    async def release_images(self, shards: list[EncodeShard]) -> None:
        """Close the transfers of a request whose encode failed (it never reaches prefill())."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self.core.release_images, shards)

    async def prefill(self, task: PrefillTask) -> PrefillResult:
        self._check()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._futures[task.request_id] = fut
        self.core.queue.append(dataclasses.replace(task, enqueued_at=time.monotonic()))
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = loop.create_task(self._run())
        self._wake.set()
        try:
            return await fut
        finally:
            self._futures.pop(task.request_id, None)

    async def cancel(self, request_id: str) -> bool:
        """Drop a queued task (its caller gets an error result). A task already in a forward
        finishes its forward; the router discards its result."""
        task = self.core.cancel_queued(request_id)
        fut = self._futures.get(request_id)
        if task is not None and fut is not None and not fut.done():
            fut.set_result(PrefillResult(request_id, None, "cancelled"))
        return task is not None

    async def _run(self) -> None:
        """Drain the queue in batches. run_batch fails a bad task by itself; if it still raises,
        the batch's tasks fail and the loop goes on. WorkerBroken from run_batch, or an exception
        outside it, is a fault of the worker: every waiting task is handed back (the router retries
        it elsewhere) and the worker reports itself failed (its calls raise WorkerLoopDied) so
        that it is replaced."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                batch = self.core.take_batch()
                if not batch:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                self._busy = len(batch)
                try:
                    results = await loop.run_in_executor(self._executor, self.core.run_batch, batch)
                except WorkerBroken:
                    raise  # not the batch's fault: the loop dies, the worker is replaced
                except Exception:
                    log.exception("prefill batch of %d failed on %s", len(batch), self.worker_id)
                    results = [PrefillResult(t.request_id, None, "the prefill failed") for t in batch]
                finally:
                    self._busy = 0
                self._answer(results)
        except asyncio.CancelledError:
            raise
        except BaseException:
            log.exception("the batch loop of %s died", self.worker_id)
            self.failed = f"the batch loop of prefill worker {self.worker_id} died"
            for fut in self._futures.values():  # the router retries them on another worker
                if not fut.done():
                    fut.set_exception(WorkerLoopDied(self.failed))

    def _answer(self, results: list[PrefillResult]) -> None:
        for r in results:
            fut = self._futures.get(r.request_id)
            if fut is not None and not fut.done():
                fut.set_result(r)

    async def status(self) -> WorkerStatus:
        self._check()
        b = self.core.blocks
        return WorkerStatus(
            self.worker_id,
            Role.PREFILL,
            self.info.node_id,
            True,
            queue_length=len(self.core.queue),
            running=self._busy,
            kv_blocks_used=b.num_used_blocks,
            kv_blocks_total=b.num_total_blocks,
            kv_blocks_cached=b.num_cached_blocks,
        )

    async def cache_events(self) -> CacheEvents:
        """On the batch thread, which changes the cache (after the batch running now, if any)."""
        self._check()
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.core.blocks.drain_events)

    async def idle(self) -> bool:
        return (
            not self.core.queue and self._busy == 0 and self.core.blocks.all_free() and not self.core.open_image_shards
        )

    async def stop(self) -> None:
        task, self._loop_task = self._loop_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(self._executor, self.core.close)
        self._executor.shutdown(wait=False)
