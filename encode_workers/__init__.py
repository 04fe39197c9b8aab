"""Encode pool: vision encoders on their own workers, an embedding cache, parallel encoding.

Modules: cache (content-hash LRU), encoder (batching across requests), service (encode + send
over kv_transfer), worker (the encode role's worker, hosted by the worker actor), transfer (wire
protocol + receiver helpers), parallel (split a request across workers).
"""
