"""One end-to-end check with two real Ray actors streaming over shm."""

import pytest
import ray
import torch

from kv_transfer import segment
from kv_transfer.registry import get_backend
from tests.helpers.kv_transfer import DST_IDS, LAYOUT, SRC_IDS, source_cache


@ray.remote(num_cpus=1, max_concurrency=2)
class Decode:
    def __init__(self) -> None:
        self.rx = get_backend("shm").Receiver(LAYOUT)
        self.kv = self.rx.allocate_cache(16)

    def prepare(self, rid):
        return self.rx.prepare(rid, DST_IDS)

    def wait_and_check(self, rid, seed) -> bool:
        for layer in range(LAYOUT.num_layers):  # streamed: each layer as it lands
            self.rx.wait(rid, layers=[layer], timeout=60)
        self.rx.wait(rid, timeout=60)
        self.rx.release(rid)
        return torch.equal(self.kv[:, :, DST_IDS], source_cache(seed)[:, :, SRC_IDS])

    def close(self) -> list[str]:
        self.rx.close()
        return segment.list_segments()


@ray.remote(num_cpus=1)
class Prefill:
    def __init__(self) -> None:
        self.tx = get_backend("shm").Sender(LAYOUT)

    def stream(self, desc, seed) -> None:
        src, rid = source_cache(seed), desc.meta.request_id
        self.tx.connect(desc)
        for layer in range(LAYOUT.num_layers):
            self.tx.send_layer(rid, layer, src[layer], src_block_ids=SRC_IDS)
        self.tx.finish(rid, timeout=60)


@pytest.mark.slow
def test_two_ray_actors_stream_over_shm():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        decode, prefill = Decode.remote(), Prefill.remote()
        desc = ray.get(decode.prepare.remote("r1"))
        checked = decode.wait_and_check.remote("r1", 11)
        ray.get(prefill.stream.remote(desc, 11))
        assert ray.get(checked, timeout=60)
        assert ray.get(decode.close.remote()) == []
    finally:
        ray.shutdown()
