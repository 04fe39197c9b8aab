"""KV transfer fixtures-as-data: a tiny KV layout, seeded source caches, and a sender running in a
child process (spawned, so it shares nothing with the test process but what a transport passes).

A source cache is `LAYOUT.cache_shape(8)`, seeded: the receiver checks `kv[:, :, DST_IDS]` against
`source_cache(seed)[:, :, SRC_IDS]` (block SRC_IDS[i] of the sender lands in DST_IDS[i]).
"""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from engine.kv_layout import KVLayout
from kv_transfer.registry import get_backend

LAYOUT = KVLayout("tiny-llama", torch.float16, num_layers=4, num_kv_heads=2, head_dim=8, block_size=4)
SRC_IDS = [5, 1, 2, 3]
DST_IDS = [10, 11, 12, 0]
TIMEOUT = 60.0


def source_cache(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(LAYOUT.cache_shape(8), generator=g).to(LAYOUT.torch_dtype)


def sender_main(backend: str, commands, results) -> None:
    """Runs in a child process: executes (op, desc, seed, n_layers) commands in order; op is
    "finish", "abort" or "hang" (some layers sent, never finished: the test kills the process).
    Each command answers ("ok", request id) or ("error", repr); None closes ("closed", None)."""
    tx = get_backend(backend).Sender(LAYOUT)
    while (cmd := commands.get()) is not None:
        op, desc, seed, n_layers = cmd
        rid, src = desc.meta.request_id, source_cache(seed)
        try:
            tx.connect(desc)
            for layer in range(n_layers):
                tx.send_layer(rid, layer, src[layer], src_block_ids=SRC_IDS)
            for spec in desc.meta.payloads:
                tx.send_payload(rid, spec.name, torch.full(spec.shape, float(seed), dtype=spec.torch_dtype))
            if op == "finish":
                tx.finish(rid, timeout=TIMEOUT)
            elif op == "abort":
                tx.abort(rid)
            results.put(("ok", rid))
        except Exception as e:  # reported to the test process
            results.put(("error", repr(e)))
    tx.close()
    results.put(("closed", None))


def start_sender(backend: str):
    """A spawned `sender_main` over `backend`: (process, command queue, result queue)."""
    ctx = mp.get_context("spawn")
    commands, results = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=sender_main, args=(backend, commands, results), daemon=True)
    proc.start()
    return proc, commands, results
