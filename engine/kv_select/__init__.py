"""Decode-side KV selection (LoopServe-style progressive selection and its baselines)."""
