"""Where an engine's tensors live: its weights and buffers, its KV cache, and what every step
builds (input ids, positions, slots, attention metadata) and hands the sampler (logits, seeded
generators). Real tensors are walked; nothing is faked on the meta device."""

from __future__ import annotations

import itertools

import torch


def resident_tensors(engine) -> dict[str, torch.Tensor]:
    """The tensors an engine holds between steps: parameters, buffers, the KV cache."""
    model = engine.loaded.model
    out = {f"param {n}": p for n, p in model.named_parameters()}
    out.update({f"buffer {n}": b for n, b in model.named_buffers()})
    out["kv cache"] = engine.runner.kv
    return out


def record_steps(engine) -> dict[str, torch.Tensor]:
    """Record, from now on, the tensors of every step the engine runs (what the runner builds and
    what the sampler is given); returns the dict they are added to."""
    seen: dict[str, torch.Tensor] = {}
    steps = itertools.count()
    build, sample, runner, sampler = engine.runner.build_plan, engine.sampler.sample, engine.runner, engine.sampler

    def spy_build(*args, **kwargs):
        ids, positions, meta = build(*args, **kwargs)
        step = next(steps)
        seen.update({f"step {step} input ids": ids, f"step {step} positions": positions})
        seen[f"step {step} slot mapping"] = meta.slot_mapping
        for i, seg in enumerate(meta.prefills):
            if seg.ctx_slots is not None:
                seen[f"step {step} prefill {i} context slots"] = seg.ctx_slots
        for i, bucket in enumerate(meta.decodes):
            seen.update({f"step {step} decode {i} {k}": getattr(bucket, k) for k in ("rows", "blocks", "mask")})
        return ids, positions, meta

    def spy_sample(logits, request_ids, params):
        seen[f"step {next(steps)} logits"] = logits
        out = sample(logits, request_ids, params)
        seen.update({f"generator of {r}": g for r, g in sampler._generators.items()})
        return out

    runner.build_plan = spy_build
    sampler.sample = spy_sample
    return seen


def off_device(tensors: dict[str, torch.Tensor], device: torch.device) -> list[str]:
    """Names of the tensors (or generators) not on `device`."""
    return [f"{name} on {t.device}" for name, t in tensors.items() if t.device != device]
