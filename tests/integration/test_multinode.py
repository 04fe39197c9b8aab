"""Router, prefill worker and decode worker on three simulated nodes; KV crosses nodes via gloo."""

import pytest

from cluster.config import parse_config
from cluster.controller import start_router
from tests.helpers.models import SMOL_NEW_TOKENS
from tests.helpers.router import LoopThread, assert_no_leaks, assert_no_segments, chat_request, run_all

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def three_nodes():
    import ray
    from ray.cluster_utils import Cluster

    sim = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    sim.add_node(num_cpus=1, resources={"prefill": 1})
    sim.add_node(num_cpus=1, resources={"decode": 1})
    loop = LoopThread()
    config = parse_config({"version": 1, "transport": {"backend": "gloo"}}, "test_multinode")
    router = loop.run(start_router(config, ray_address=sim.address))
    yield loop, router
    loop.run(router.shutdown())
    loop.close()
    assert_no_segments()
    ray.shutdown()
    sim.shutdown()


def test_three_nodes_greedy_identical(three_nodes, smol_chats, smol_reference, smol_colocated):
    import ray

    loop, router = three_nodes
    status = loop.run(router.cluster_status())
    nodes = {w.role.value: w.node_id for w in status.workers}
    router_node = ray.get_runtime_context().get_node_id()
    assert len({nodes["prefill"], nodes["decode"], router_node}) == 3, (nodes, router_node)

    # five of the 20 prompts (10..2000 tokens), concurrently; test_disaggregated.py runs the
    # others on one node
    picked = [1, 5, 9, 13, 19]
    requests = [chat_request(f"mn-{i}", smol_chats[i], SMOL_NEW_TOKENS) for i in picked]
    results = loop.run(run_all(router, requests))
    assert all(r.final.error is None for r in results), [r.final.error for r in results]
    got = [r.token_ids for r in results]
    assert got == [smol_colocated[i] for i in picked]
    assert got == [smol_reference[i] for i in picked]
    assert_no_leaks(loop, router)
