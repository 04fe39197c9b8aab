"""Intra-request parallel encoding: split one request's images across encode workers, gather.

Images go to workers by content hash (the same picture lands on the same worker, whose cache
then has it) within a balance cap of ceil(n / workers) images per worker, so a request's
images are spread evenly. The router calls:

    shards = plan_shards(request_id, images, len(workers))
    descs = <prefill worker>.prepare_image_receive(shards)      (see transfer.py)
    stats = await encode_parallel(workers, shards, images, descs)
"""

from __future__ import annotations

import asyncio
import hashlib

from encode_workers.transfer import EncodeShard, EncodeStats
from kv_transfer.layout import TransferDescriptor


def plan_shards(request_id: str, images: list[bytes], num_workers: int) -> list[tuple[int, EncodeShard]]:
    """[(worker index, shard)] for the workers that get images; shard ids `<rid>/encode.<worker>`."""
    if num_workers <= 0:
        raise ValueError(f"need at least one encode worker, got {num_workers}")
    cap = -(-len(images) // num_workers)
    assigned: list[list[int]] = [[] for _ in range(num_workers)]
    for i, data in enumerate(images):
        home = int.from_bytes(hashlib.sha256(data).digest()[:8], "little") % num_workers
        if len(assigned[home]) >= cap:
            home = min(range(num_workers), key=lambda w: (len(assigned[w]), w))
        assigned[home].append(i)
    return [(w, EncodeShard(f"{request_id}/encode.{w}", tuple(idx))) for w, idx in enumerate(assigned) if idx]


async def encode_parallel(
    workers: list,
    plan: list[tuple[int, EncodeShard]],
    images: list[bytes],
    descriptors: list[TransferDescriptor],
    *,
    timeout: float | None = None,
    epochs: list[int] | None = None,
) -> list[EncodeStats]:
    """Call every shard's worker at once (Ray actor handles); the stats in shard order.

    epochs: per worker, the epoch the call is meant for (a worker that switched role since
    refuses it; cluster/worker_actor.py). A failing shard raises here; the receiver sees that
    shard CANCELLED (the worker aborts it).
    """
    refs = [
        workers[w].encode.remote(
            shard.transfer_id,
            [images[i] for i in shard.image_indices],
            desc,
            **({"epoch": epochs[w]} if epochs is not None else {}),
        )
        for (w, shard), desc in zip(plan, descriptors)
    ]
    return list(await asyncio.wait_for(asyncio.gather(*refs), timeout))
