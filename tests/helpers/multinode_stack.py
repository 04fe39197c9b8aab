"""A whole serving stack on a simulated three-node Ray cluster, in one process tree, for the chaos
tests: this process starts the nodes (`ray.cluster_utils.Cluster`: a head, a node offering the
`prefill` resource and one offering `decode`, each with its own raylet), then the router and the
gateway joined to them, prints `READY <gRPC target>` and serves until it is killed.

    python -m tests.helpers.multinode_stack [--transport shm]

The KV transport defaults to shm: the simulated nodes share this machine, so the decode worker's
cache is a memory segment that the prefill worker on another node maps (what the chaos test
watches being freed). Every process of the stack descends from this one: killing its tree kills
every node's Ray, the workers and the gateway."""

from __future__ import annotations

import argparse
import asyncio
import sys


async def main(transport: str) -> None:
    from ray.cluster_utils import Cluster

    from cluster.config import parse_config
    from cluster.serve import start_serving

    sim = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    sim.add_node(num_cpus=1, resources={"prefill": 1})
    sim.add_node(num_cpus=1, resources={"decode": 1})
    config = parse_config(
        {
            "version": 1,
            "transport": {"backend": transport},
            "server": {"grpc_port": 0, "http_port": 0, "admin_port": 0},
        },
        "multinode_stack",
    )
    _, running = await start_serving(config, address=sim.address, progress=lambda *_: None)
    print(f"READY {running.connect_host}:{running.grpc_port}", flush=True)
    await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--transport", default="shm")
    asyncio.run(main(parser.parse_args().transport))
    sys.exit(0)
