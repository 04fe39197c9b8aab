"""Tensor-parallel step time on this machine: prefill and decode forwards at TP 1 / 2 (one thread
per rank, real gloo ranks in processes of their own), and where the time goes.

    .venv/bin/python -m bench.tp [--tp 1,2] [--prompt 512] [--batch 16] [--context 1024] [--repeats 5]

The model is SmolLM2-135M's shape (30 layers, hidden 576, MLP 1536) with 8 attention
heads (head dim 72) and 2 KV heads instead of 9 and 3, so that TP 2 divides them; weights are seeded random (step
time does not depend on their values). Each rank runs the engine's ModelRunner on its shard
(engine/tensor_parallel.py); rank 0 drives. Per TP degree it prints, for one prefill forward of
--prompt tokens and one decode forward of --batch sequences at --context tokens each: the median
step time, the part spent in the row-wise layers' all-reduces (waiting for the slower rank
included) and the rest (compute, plus DTensor's dispatch). With P cores, TP > P oversubscribes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from bench.common import print_table


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tp", default="1,2", help="comma-separated TP degrees (each must divide 8 heads and 2 KV heads)")
    p.add_argument("--prompt", type=int, default=512, help="prefill tokens (one sequence)")
    p.add_argument("--batch", type=int, default=16, help="decode sequences")
    p.add_argument("--context", type=int, default=1024, help="context tokens of each decode sequence")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layers", type=int, default=30)
    args = p.parse_args(argv)
    args.tp = [int(t) for t in args.tp.split(",")]
    if any(t not in (1, 2) for t in args.tp) or args.repeats < 1:
        p.error("--tp takes degrees 1 and 2 (8 heads, 2 KV heads); --repeats >= 1")
    return args


def model_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )


def _rank(tp, args) -> dict | None:
    import torch
    from transformers import LlamaForCausalLM

    from engine.config import EngineConfig
    from engine.llm_engine import LoadedModel, tp_runner
    from engine.model_runner import PlanRow
    from engine.tensor_parallel import follow

    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config(args.layers)).eval()
    block = 16
    per_seq = -(-max(args.prompt, args.context + 1) // block)
    config = EngineConfig(block_size=block, num_kv_blocks=per_seq * max(args.batch, 1) + 1, tensor_parallel=tp.size)
    tp.profile = True
    runner = tp_runner(LoadedModel(model, None, "bench-tp"), config, tp)
    if not tp.is_driver:
        follow(runner, tp)
        return None
    gen = torch.Generator().manual_seed(1)

    def table(i: int) -> tuple[int, ...]:
        return tuple(range(1 + i * per_seq, 1 + (i + 1) * per_seq))

    prefill = [PlanRow(tuple(torch.randint(3, 49152, (args.prompt,), generator=gen).tolist()), 0, table(0), True)]
    decode = [PlanRow((5,), args.context, table(i), True) for i in range(args.batch)]
    out = {}
    for name, plan in (("prefill", prefill), ("decode", decode)):
        runner.forward_plan(plan)  # warm-up
        totals, reduces = [], []
        for _ in range(args.repeats):
            tp.allreduce_s = 0.0
            t0 = time.perf_counter()
            runner.forward_plan(plan)
            totals.append(time.perf_counter() - t0)
            reduces.append(tp.allreduce_s)
        out[name] = (statistics.median(totals), statistics.median(reduces))
    tp.stop()
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    from engine.tensor_parallel import run_local_group

    print(
        f"bench.tp: {args.layers} layers, hidden 576, 8 heads / 2 KV heads; prefill {args.prompt} tokens; "
        f"decode {args.batch} x {args.context} context; {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    rows = []
    for t in args.tp:
        res = run_local_group(_rank, t, args)
        for name in ("prefill", "decode"):
            total, reduce = res[name]
            rows.append(
                [
                    f"TP {t}",
                    name,
                    f"{total * 1e3:.1f}",
                    f"{reduce * 1e3:.1f} ({100 * reduce / total:.0f}%)",
                    f"{(total - reduce) * 1e3:.1f}",
                ]
            )
        print(f"TP {t} done", flush=True)
    print_table(["degree", "forward", "step ms (median)", "all-reduce ms", "compute + dispatch ms"], rows)


if __name__ == "__main__":
    main()
