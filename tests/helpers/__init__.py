"""Builders shared by test modules. A test module imports helpers from here (and fixtures come from
`tests/conftest.py`), never from another test module, so each test file can be read, run and
moved on its own.

- `models`: the tiny seeded Llama, the transformers greedy oracle, the real-model prompt sizes.
- `llava`: the tiny seeded LLaVA, seeded images, LLaVA's own image features.
- `kv_transfer`: a tiny KV layout, seeded source caches, a KV sender in a child process.
- `gateway`: a fake Router, the real gateway on its own thread, Prometheus sample parsing.
- `router`: driving an asyncio router from synchronous tests, and the cluster leak checks.

Where tests go: `tests/unit/` runs in one process without Ray (fakes, tiny models, child processes
at most); `tests/integration/` starts Ray or a whole cluster; `tests/gpu/` needs CUDA.
"""
