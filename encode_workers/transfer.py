"""How image features travel from encode workers to a prefill worker over kv_transfer.

One request's images may be split into shards, one shard per encode worker. Each shard is its
own kv_transfer request (id `<request id>/encode.<k>`) with no KV layers and one payload per
image, named `image.<i>` by the image's index in the request:

    router                         prefill worker (receiver)              encode worker k (sender)
    ------                         -------------------------              ------------------------
    shards = plan_shards(...)
    descs = prefill.prepare(shards) --> prepare_image_receive(rx, shards, spec)
    encode_parallel(workers, ..) ------------------------------------------> connect(desc)
                                                                            send_payload(image.i) per image
                                   receive_image_features(rx, shards) <--- finish()
                                   (copies out, releases every shard)

Both ends agree on [num_image_tokens, hidden] and dtype through the receiver's PayloadSpecs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from engine.multimodal import ImageFeatureSpec
from kv_transfer.base import KVReceiver
from kv_transfer.layout import PayloadSpec, TransferDescriptor

ENCODE_PROTOCOL_VERSION = 1


def payload_name(image_index: int) -> str:
    return f"image.{image_index}"


@dataclass(frozen=True)
class EncodeShard:
    """The images of one request that one encode worker handles, and its transfer id."""

    transfer_id: str
    image_indices: tuple[int, ...]


@dataclass(frozen=True)
class EncodeStats:
    """What an encode worker reports for one shard."""

    transfer_id: str
    worker_id: str
    num_images: int
    cache_hits: int
    encode_s: float  # waiting for this shard's vision forwards (0 when all hits)
    total_s: float  # encode() call, connect to finish
    version: int = ENCODE_PROTOCOL_VERSION


def prepare_image_receive(
    receiver: KVReceiver, shards: list[EncodeShard], spec: ImageFeatureSpec
) -> list[TransferDescriptor]:
    """Open one payload-only transfer per shard; returns the descriptors for the encode workers."""
    descs = []
    try:
        for shard in shards:
            payloads = [PayloadSpec(payload_name(i), spec.shape, spec.dtype) for i in shard.image_indices]
            descs.append(receiver.prepare(shard.transfer_id, [], layers=range(0), payloads=payloads))
    except BaseException:
        release_image_transfers(receiver, shards)
        raise
    return descs


def receive_image_features(receiver: KVReceiver, shards: list[EncodeShard], *, timeout: float) -> list[torch.Tensor]:
    """Wait for every shard, return the features in image order (owned copies), release all shards.

    Raises the transport's TransferError / TransferTimeout; the shards are released either way.
    """
    by_index: dict[int, torch.Tensor] = {}
    deadline = time.monotonic() + timeout  # one deadline for the whole request, not per image
    try:
        for shard in shards:
            for i in shard.image_indices:
                left = max(0.0, deadline - time.monotonic())
                by_index[i] = receiver.recv_payload(shard.transfer_id, payload_name(i), timeout=left).clone()
    finally:
        release_image_transfers(receiver, shards)
    return [by_index[i] for i in sorted(by_index)]


def release_image_transfers(receiver: KVReceiver, shards: list[EncodeShard]) -> None:
    for shard in shards:
        receiver.release(shard.transfer_id)
