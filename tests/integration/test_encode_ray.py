"""Encode workers as real Ray actors: a 3-image request split over two workers, features over shm."""

from __future__ import annotations

import asyncio

import pytest
import torch

from encode_workers.parallel import encode_parallel, plan_shards
from encode_workers.service import EncodeService
from encode_workers.transfer import prepare_image_receive, receive_image_features
from engine import multimodal
from engine.worker_api import Role
from kv_transfer import segment
from engine.kv_layout import KVLayout
from kv_transfer.registry import get_backend
from tests.helpers.llava import build_tiny_llava, png_bytes

pytestmark = pytest.mark.slow

LAYOUT = KVLayout("tiny-llava", "float32", num_layers=2, num_kv_heads=2, head_dim=16, block_size=8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llava")
    build_tiny_llava(seed=9).save_pretrained(path)
    return str(path)


def local_features(model_dir, images):
    service = EncodeService.from_model_dir(model_dir, backend="fake")
    enc = service.encoder
    return [enc.forward(enc.preprocess(b, i)[None])[0] for i, b in enumerate(images)]


def encode_request(workers, rx, spec, rid, images):
    plan = plan_shards(rid, images, len(workers))
    descs = prepare_image_receive(rx, [s for _, s in plan], spec)
    stats = asyncio.run(encode_parallel(workers, plan, images, descs, timeout=120))
    return receive_image_features(rx, [s for _, s in plan], timeout=60), plan, stats


def encode_worker(model_dir, worker_id: str, num_cpus: float):
    """A plain encode worker as the controller starts one: the worker actor with the encode role alone."""
    import ray

    from cluster.worker_actor import WorkerActor
    from encode_workers.worker import EncodeOptions

    return (
        ray.remote(WorkerActor)
        .options(num_cpus=num_cpus, resources={"encode": 1})
        .remote(worker_id, None, {Role.ENCODE: EncodeOptions(model_dir, backend="shm")}, 1, Role.ENCODE)
    )


def check_two_workers(workers, model_dir):
    import ray

    spec = multimodal.ImageFeatureSpec.from_config(multimodal.load_llava_config(model_dir))
    images = [png_bytes(i) for i in range(3)]
    rx = get_backend("shm").Receiver(LAYOUT)
    try:
        feats, plan, stats = encode_request(workers, rx, spec, "r1", images)
        assert len(plan) == 2 and sorted(len(s.image_indices) for _, s in plan) == [1, 2]
        for got, ref in zip(feats, local_features(model_dir, images)):
            torch.testing.assert_close(got, ref)
        assert sum(s.num_images for s in stats) == 3 and sum(s.cache_hits for s in stats) == 0
        calls = [ray.get(w.stats.remote())["encoder_calls"] for w in workers]
        assert calls == [1, 1]

        again, _, stats2 = encode_request(workers, rx, spec, "r2", images)  # same images: same workers
        assert sum(s.cache_hits for s in stats2) == 3
        assert [ray.get(w.stats.remote())["encoder_calls"] for w in workers] == calls
        assert all(torch.equal(a, b) for a, b in zip(again, feats))
    finally:
        rx.close()
    assert segment.list_segments() == []


def test_two_encode_workers_one_node(model_dir):
    import ray

    ray.init(address="local", num_cpus=2, resources={"encode": 2}, include_dashboard=False, log_to_driver=False)
    try:
        workers = [encode_worker(model_dir, f"enc{k}", num_cpus=1) for k in range(2)]
        check_two_workers(workers, model_dir)
    finally:
        ray.shutdown()


def test_encode_worker_on_another_simulated_node(model_dir):
    import ray
    from ray.cluster_utils import Cluster

    sim = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    sim.add_node(num_cpus=1, resources={"encode": 2})
    try:
        ray.init(address=sim.address, log_to_driver=False)
        workers = [encode_worker(model_dir, f"enc{k}", num_cpus=0.5) for k in range(2)]
        nodes = {ray.get(w.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())) for w in workers}
        assert ray.get_runtime_context().get_node_id() not in nodes
        check_two_workers(workers, model_dir)  # simulated nodes share /dev/shm, so shm still works
    finally:
        ray.shutdown()
        sim.shutdown()
