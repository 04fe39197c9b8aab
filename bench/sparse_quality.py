"""Sparse prefill quality on the real SmolLM2-135M: density, attention mass kept, attention
output error and RULER-style task answers, dense vs FlexPrefill vs static at matched density.

    OMP_NUM_THREADS=1 python bench/sparse_quality.py [--lengths 4096,8176] [--count 4096:5,8176:2]
        [--kinds passkey,needle,vartrack,cwe] [--layers 3,15,27] [--max-tokens 16]
        [--measure all|first] [--json results.json] [--verbose] [--gamma G] [--min-budget N]
        [--methods dense,flexprefill,static] [--accuracy flexprefill,static]  ("" = none)

1. Dense: every prompt (bench/ruler.py, `count` per kind and length; depths cycle through
   10%..90% within a kind) through LLMEngine, one forward per prompt (max_num_batched_tokens >=
   prompt); greedy answers scored. While the measured prompts run (every prompt with
   `--measure all`, the first of each kind with `first`), q/k/v of `--layers` are captured
   (post-RoPE, from the engine's own attention call).
2. On the captured q/k/v, per method: block index density, attention mass kept (exact, mean over
   heads and 10th percentile over heads; engine/sparse/quality.py) and the relative error of the
   layer's attention output vs dense, ||o - o_dense|| / ||o_dense||.
3. The static pattern's local window is tuned per length so its density is the closest to
   FlexPrefill's mean density there (its density does not depend on the input).
4. FlexPrefill and static: every prompt through LLMEngine(EngineConfig(sparse=...)); answers
   scored and compared with dense (same answer string = greedy text equal; "lost" = dense
   right, sparse wrong), in total and per task kind.
With `--json`, every finished row (metrics, texts, answers) is written there as soon as it
exists, so a long run that fails later keeps what it measured.
8K prompts are 8176 tokens so that prompt + 16 new tokens fit SmolLM2's 8192 positions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ruler import KINDS, RulerTask, make_tasks, score  # noqa: E402


@dataclass
class MethodRow:
    name: str
    length: int
    density: list[float] = field(default_factory=list)
    mass_mean: list[float] = field(default_factory=list)
    mass_p10: list[float] = field(default_factory=list)
    rel_err: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    prefill_s: float = 0.0
    kinds: list[str] = field(default_factory=list)  # task kind of each text


class Capture:
    """Records (q, k, v) [L, H, D] of chosen layers from the engine's attention for one forward:
    re-registers the engine's attention implementation with a recording wrapper."""

    def __init__(self, layers: list[int]) -> None:
        self.layers = set(layers)
        self.got: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.active = False

    def __enter__(self):
        from transformers import AttentionInterface

        from engine import attention

        def recording(module, query, key, value, attention_mask, scaling=None, **kw):
            if self.active and module.layer_idx in self.layers and kw.get("triptych_meta"):
                self.got[module.layer_idx] = tuple(x[0].transpose(0, 1).clone() for x in (query, key, value))
                self.scale = scaling
            return attention.paged_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kw)

        AttentionInterface.register(attention.ATTN_IMPLEMENTATION, recording)
        return self

    def __exit__(self, *exc) -> None:
        from engine import attention

        attention.register()


def run_engine(
    loaded,
    tasks: list[RulerTask],
    sparse,
    max_tokens: int,
    capture: Capture | None = None,
    capture_idx: set[int] = frozenset(),
) -> tuple[list[str], float, list[dict]]:
    """Greedy texts of all tasks (one request at a time, one forward per prompt), the summed
    prefill wall time, and the captured layers of tasks in capture_idx."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sequence import SamplingParams

    longest = max(t.length for t in tasks)
    engine = LLMEngine(
        EngineConfig(
            num_kv_blocks=(longest + max_tokens) // 16 + 8,
            max_num_batched_tokens=longest,
            max_num_seqs=1,
            sparse=sparse,
        ),
        loaded,
    )
    texts, prefill, caps = [], 0.0, []
    if capture is not None:  # after the engine: its model runner registers the plain version
        capture.__enter__()
    for i, t in enumerate(tasks):
        rid = engine.add_request(list(t.prompt_ids), SamplingParams(max_tokens=max_tokens))
        if capture is not None:
            capture.active, capture.got = i in capture_idx, {}
        t0 = time.perf_counter()
        outs = engine.step()  # the whole prompt in one forward
        prefill += time.perf_counter() - t0
        if capture is not None:
            capture.active = False
            if i in capture_idx:
                caps.append(dict(capture.got))
        while engine.has_unfinished():
            outs += engine.step()
        texts.append("".join(o.new_text for o in outs if o.request_id == rid))
    if capture is not None:
        capture.__exit__()
    assert engine.blocks.all_free()
    return texts, prefill, caps


def layer_metrics(q, k, v, scale, cfg) -> tuple[float, float, float, float]:
    """-> (density, mass mean, mass p10 over heads, output relative error) for one layer."""
    from engine.sparse import attention_mass_kept, block_sparse_attention, build_index
    from engine.sparse.dense import dense_causal_attention

    index, _ = build_index(q, k, 0, scale, cfg)
    mean, p10, _ = attention_mass_kept(q, k, index, scale)
    out, _ = block_sparse_attention(q, k, v, index, scale)
    ref = dense_causal_attention(q, k, v, 0, scale)
    err = ((out - ref).norm() / ref.norm()).item()
    return index.density(), mean, p10, err


def static_local_for(density: float, length: int, heads: int, base) -> int:
    """The static window (blocks) whose density at `length` is the closest to `density`."""
    from engine.sparse import static_index

    best = min(
        range(1, length // base.block_size + 1),
        key=lambda w: abs(static_index(heads, 0, length, base.block_size, base.sink, w).density() - density),
    )
    return best


def fmt_row(r: MethodRow, dense: MethodRow) -> str:
    if not r.texts:
        return (
            f"{r.length:>5} {r.name:<18} {statistics.mean(r.density):>7.3f} "
            f"{statistics.mean(r.mass_mean):>9.4f} {statistics.mean(r.mass_p10):>8.4f} "
            f"{statistics.mean(r.rel_err):>8.4f} {'-':>8} {'-':>8} {'-':>4} {'-':>9}"
        )
    same = sum(a == b for a, b in zip(r.texts, dense.texts))
    lost = sum(d and not c for d, c in zip(dense.correct, r.correct))
    n = len(r.correct)
    return (
        f"{r.length:>5} {r.name:<18} {statistics.mean(r.density):>7.3f} "
        f"{statistics.mean(r.mass_mean):>9.4f} {statistics.mean(r.mass_p10):>8.4f} "
        f"{statistics.mean(r.rel_err):>8.4f} {sum(r.correct):>4}/{n:<3} {same:>4}/{n:<3} "
        f"{lost:>4} {r.prefill_s / n:>9.1f}"
    )


def fmt_kinds(rows: list[MethodRow], length: int) -> list[str]:
    """Per task kind at one length: right / same / lost of every method with answers."""
    dense = next(r for r in rows if r.length == length and r.name == "dense")
    mine = [r for r in rows if r.length == length and r.texts]
    out = []
    for kind in dict.fromkeys(dense.kinds):
        idx = [i for i, k in enumerate(dense.kinds) if k == kind]
        cells = []
        for r in mine:
            right = sum(r.correct[i] for i in idx)
            same = sum(r.texts[i] == dense.texts[i] for i in idx)
            lost = sum(dense.correct[i] and not r.correct[i] for i in idx)
            cells.append(f"{r.name.split('(')[0]} {right}/{len(idx)} right, {same} same, {lost} lost")
        out.append(f"{length:>5} {kind:<8} " + "; ".join(cells))
    return out


def dump_json(path: str | None, rows: list[MethodRow], header: dict) -> None:
    if not path:
        return
    import json
    from dataclasses import asdict

    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps({**header, "rows": [asdict(r) for r in rows]}, indent=1))
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="4096,8176")
    ap.add_argument(
        "--count", default="4096:5,8176:2", help="tasks per kind, per length (LENGTH:N,...; 1 for lengths not named)"
    )
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--layers", default="3,15,27", help="layers whose q/k/v are measured")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--methods", default="dense,flexprefill,static")
    ap.add_argument("--gamma", type=float, default=None, help="FlexPrefill gamma (default: SparsePrefillConfig's)")
    ap.add_argument(
        "--min-budget", type=int, default=None, help="FlexPrefill min_budget in tokens (default: SparsePrefillConfig's)"
    )
    ap.add_argument(
        "--accuracy",
        default="flexprefill,static",
        help="sparse methods whose task answers are computed (dense always is)",
    )
    ap.add_argument(
        "--measure",
        choices=("all", "first"),
        default="all",
        help="prompts whose layers are measured: all, or the first of each kind",
    )
    ap.add_argument("--json", default=None, help="write the rows here as they finish")
    ap.add_argument("--verbose", action="store_true", help="print every answer")
    args = ap.parse_args()

    from engine.llm_engine import LoadedModel
    from engine.sparse import SparsePrefillConfig

    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
    loaded = LoadedModel.load(None)
    heads = loaded.model.config.num_attention_heads
    kinds = tuple(args.kinds.split(","))
    counts = dict(tuple(map(int, c.split(":"))) for c in args.count.split(","))
    layers = [int(x) for x in args.layers.split(",")]
    methods = args.methods.split(",")
    overrides = {k: v for k, v in (("gamma", args.gamma), ("min_budget", args.min_budget)) if v is not None}
    flex = SparsePrefillConfig(method="flexprefill", dense_below=1024, **overrides)
    which = "every task" if args.measure == "all" else "the first task of each kind"
    print(
        f"SmolLM2-135M-Instruct fp32, torch {torch.__version__}, {torch.get_num_threads()} "
        f"thread(s); flexprefill {flex}; layers {layers} measured on {which}; "
        f"{args.max_tokens} greedy tokens",
        flush=True,
    )
    header = {
        "argv": sys.argv[1:],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "flexprefill": repr(flex),
    }
    rows: list[MethodRow] = []
    for length in [int(x) for x in args.lengths.split(",")]:
        count = counts.get(length, 1)
        tasks = make_tasks(loaded.tokenizer, length, kinds, count)
        kinds_of = [t.kind for t in tasks]
        print(
            f"  {length}: {len(tasks)} tasks: "
            + ", ".join(
                f"{k} x{kinds_of.count(k)} depths {sorted({t.depth for t in tasks if t.kind == k})}"
                for k in dict.fromkeys(kinds_of)
            ),
            flush=True,
        )
        measured_idx = set(range(len(tasks))) if args.measure == "all" else {i for i in range(0, len(tasks), count)}
        capture = Capture(layers)
        texts, pre, caps = run_engine(loaded, tasks, None, args.max_tokens, capture, measured_idx)
        scale = capture.scale
        dense = MethodRow(
            "dense",
            length,
            [1.0],
            [1.0],
            [1.0],
            [0.0],
            texts,
            [score(t, x) for t, x in zip(tasks, texts)],
            pre,
            kinds_of,
        )
        rows.append(dense)
        dump_json(args.json, rows, header)
        print(
            f"  {length}: dense done ({pre:.0f} s prefill), right "
            f"{[t.kind for t, c in zip(tasks, dense.correct) if c]}",
            flush=True,
        )
        measured = {}

        def measure(name, cfg):
            row = MethodRow(name, length)
            t0 = time.perf_counter()
            for cap in caps:
                for layer in layers:
                    d, m, p, e = layer_metrics(*cap[layer], scale, cfg)
                    row.density.append(d)
                    row.mass_mean.append(m)  # noqa: E702
                    row.mass_p10.append(p)
                    row.rel_err.append(e)  # noqa: E702
            measured[name] = (row, cfg)
            print(
                f"  {length}: {name} measured on {len(caps)} prompt(s) x {len(layers)} "
                f"layers in {time.perf_counter() - t0:.0f} s: density "
                f"{statistics.mean(row.density):.3f}, mass {statistics.mean(row.mass_mean):.4f}"
                f", err {statistics.mean(row.rel_err):.4f}",
                flush=True,
            )
            return row

        if "flexprefill" in methods:
            measure("flexprefill", flex)
        if "static" in methods:
            target = statistics.mean(measured["flexprefill"][0].density) if measured else 0.3
            local = static_local_for(target, length, heads, flex)
            static = replace(flex, method="static", local=local)
            measure(f"static(local={local})", static)
        for name, (row, cfg) in measured.items():
            if name.split("(")[0] not in args.accuracy.split(","):
                rows.append(row)  # mass / error / density only
                dump_json(args.json, rows, header)
                continue
            row.texts, row.prefill_s, _ = run_engine(loaded, tasks, cfg, args.max_tokens)
            row.correct = [score(t, x) for t, x in zip(tasks, row.texts)]
            row.kinds = kinds_of
            rows.append(row)
            dump_json(args.json, rows, header)
            print(f"  {length}: {name} done ({row.prefill_s:.0f} s prefill)", flush=True)
        if args.verbose:
            for i, t in enumerate(tasks):
                print(
                    f"    {t.kind:<8} {t.depth:.1f} want {t.answers}: "
                    + " | ".join(f"{r.name}={r.texts[i]!r}" for r in rows if r.length == length and r.texts)
                )

    print()
    print(
        "density = fraction of causal (head, q block, k block) computed; mass = true softmax "
        "mass inside the index (mean / 10th pct over heads); err = ||o - o_dense|| / "
        "||o_dense|| of the layer's attention output; right = task answers correct; same = "
        "greedy text identical to dense; lost = dense right, method wrong; prefill = s per "
        "prompt (engine forward incl. index building)"
    )
    print(
        f"{'L':>5} {'method':<18} {'density':>7} {'mass mean':>9} {'mass p10':>8} "
        f"{'err':>8} {'right':>8} {'same':>8} {'lost':>4} {'prefill s':>9}"
    )
    for length in sorted({r.length for r in rows}):
        dense = next(r for r in rows if r.length == length and r.name == "dense")
        for r in rows:
            if r.length == length:
                print(fmt_row(r, dense))
    print()
    print(
        "per task kind (right = correct answers; same = greedy text identical to dense; "
        "lost = dense right, method wrong):"
    )
    for length in sorted({r.length for r in rows}):
        for line in fmt_kinds(rows, length):
            print(line)
    print()
    for name in sorted({r.name.split("(")[0] for r in rows} - {"dense"}):
        mine = [r for r in rows if r.name.startswith(name) and r.texts]
        for r in mine:
            dr = next(d for d in rows if d.name == "dense" and d.length == r.length)
            lost = sum(d and not c for d, c in zip(dr.correct, r.correct))
            print(
                f"{name} at {r.length}: lost {lost} of {len(r.correct)} answers vs dense "
                f"(dense right {sum(dr.correct)}; goal: lost <= {len(r.correct) / 20:.2f})"
            )


if __name__ == "__main__":
    main()
