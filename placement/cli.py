"""`triptych plan`: choose a goodput-optimal placement and write it as a deploy YAML.

    triptych plan --model Llama-3-8B --cluster placement/clusters/a100-4x8.yaml \
        --trace AzureLLMInferenceTrace_conv_2023.csv --ttft-slo 1 --tpot-slo 0.1 -o plan.yaml

Prints which TP degrees it searched (those dividing the attention and KV heads; PP is always 1,
pipeline parallelism is not built), the chosen placement, its predicted goodput and attainment and
the runners-up; writes plan.yaml and plan.png (SLO attainment vs. rate, chosen plan vs. the
alternative), both of which repeat the parallelism note. Progress goes to
stderr. To stay fast the simulations replay a sample of the trace (--sample fit requests per
per-phase run, twice that held out per whole-cluster run), which the output says.
Exit codes: 0 planned, 2 bad input or infeasible (one-line message, no traceback).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from placement import trace as tr
from placement.catalog import model_by_name
from placement.errors import PlanningError
from placement.hardware import load_cluster
from placement.latency_model import FittedProfile, PerfModel
from placement.plan_yaml import write_plan
from placement.profile import load_profile
from placement.search import Plan, SearchResult, SearchSettings, Searcher
from placement.simulator import Slo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a(
        "--model",
        required=True,
        help="known model name (e.g. Llama-3-8B), a profile .json from `triptych profile`, "
        "or comma-separated profiles of one model at different TP/PP",
    )
    a("--cluster", required=True, help="cluster YAML (see placement/clusters/)")
    a("--trace", required=True, help="Azure .csv or Mooncake .jsonl trace")
    a("--ttft-slo", type=float, required=True, help="time-to-first-token SLO, seconds")
    a("--tpot-slo", type=float, required=True, help="time-per-output-token SLO, seconds")
    a("--rate", type=float, default=None, help="target rate, req/s (default: the most the cluster holds)")
    a("--low-affinity", action="store_true", help="DistServe Algorithm 2: prefill/decode stages share nodes")
    a(
        "--time-scale",
        "--trace-scale",
        dest="time_scale",
        type=float,
        default=1.0,
        help="multiply trace arrival times (burst shape only; the search probes its own rates)",
    )
    a("--length-scale", type=float, default=1.0, help="multiply prompt and output lengths")
    a("--max-model-len", type=int, default=8192, help="clip prompt+output to this many tokens")
    a("--trace-start", type=int, default=0, help="first trace request used")
    a("--trace-count", type=int, default=4000, help="trace requests used (fit + held-out)")
    a("--sample", type=int, default=300, help="fit requests per per-phase simulation")
    a(
        "--band-slices",
        type=int,
        default=8,
        help="disjoint slices of the whole trace each plan's goodput is predicted on (its p10-p90 band; "
        "the pick maximises the p10 per device); 0: no band, pick by the held-out prediction",
    )
    a("--token-budget", type=int, default=2048, help="prefill batch / colocated iteration token budget")
    a("--max-batch", type=int, default=256, help="sequences per decode batch")
    a("--model-path", default=None, help="model directory written to model.path in the YAML")
    a("-o", "--output", required=True, help="deploy YAML to write; the plot goes next to it (.png)")


def _settings(args: argparse.Namespace) -> SearchSettings:
    for name in ("ttft_slo", "tpot_slo"):
        if getattr(args, name) <= 0:
            raise PlanningError(f"--{name.replace('_', '-')} must be > 0 seconds, got {getattr(args, name)}")
    if args.rate is not None and args.rate <= 0:
        raise PlanningError(f"--rate must be > 0 req/s, got {args.rate}")
    if args.sample < 10:
        raise PlanningError(f"--sample must be >= 10, got {args.sample}")
    if args.band_slices < 0 or args.band_slices == 1:
        raise PlanningError(f"--band-slices must be 0 (no band) or >= 2, got {args.band_slices}")
    return SearchSettings(
        slo=Slo(args.ttft_slo, args.tpot_slo),
        max_model_len=args.max_model_len,
        rate=args.rate,
        low_affinity=args.low_affinity,
        fit_sample=args.sample,
        verify_sample=2 * args.sample,
        token_budget=args.token_budget,
        max_batch=args.max_batch,
    )


def perf_model(model: str, cluster_path: str | Path) -> PerfModel:
    """`--model`: a known name, a profile .json, or several profiles of one model at different
    (TP, PP) joined by commas (the first is the reference the others' configurations scale from)."""
    cluster = load_cluster(cluster_path)
    parts = [m for m in model.split(",") if m]
    if any(m.endswith(".json") or Path(m).is_file() for m in parts):
        profiles = [load_profile(m) for m in parts]
        names = {p.model.name for p in profiles}
        if len(names) > 1:
            raise PlanningError(f"--model: the profiles are of different models ({', '.join(sorted(names))})")
        fits = [FittedProfile.from_profile(p) for p in profiles]
        seen = [(f.tp, f.pp) for f in fits]
        if len(set(seen)) < len(seen):
            raise PlanningError(f"--model: two profiles at the same (TP, PP) {sorted(seen)}")
        return PerfModel(profiles[0].model, cluster, fits[0], tuple(fits[1:]))
    return PerfModel(model_by_name(model), cluster)


def _perf(args: argparse.Namespace) -> PerfModel:
    return perf_model(args.model, args.cluster)


def _table(plans: tuple[Plan, ...]) -> str:
    rows = [("#", "mode", "placement", "devices", "goodput req/s", "per device", "attain@rate", "band p10/med/p90")]
    for i, p in enumerate(plans):
        rows.append(
            (
                str(i),
                p.mode.value,
                p.describe(),
                str(p.num_gpus),
                f"{p.goodput:.3g}",
                f"{p.goodput_per_gpu:.3g}",
                f"{p.attainment:.1%}@{p.rate:.3g}",
                "/".join(f"{x:.3g}" for x in p.band) if p.band else "-",
            )
        )
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def _plot(path: Path, searcher: Searcher, result: SearchResult, progress) -> bool:
    """Write the attainment-vs-rate plot; False (and said) where matplotlib (the `plot` extra) is missing."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        progress("no plot: matplotlib is not installed (pip install 'triptych[plot]')")
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = result.chosen
    alt = (
        result.colocated
        if result.colocated is not None and result.colocated is not chosen
        else next((p for p in result.plans[1:] if p.mode is not chosen.mode), None)
    )
    top = max(p.goodput for p in (chosen, alt) if p is not None)
    rates = [top * f for f in (0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for plan, style in ((chosen, "o-"), (alt, "s--")):
        if plan is None:
            continue
        progress(f"plot: attainment vs rate for {plan.mode.value} {plan.describe()}")
        att = searcher.curve(plan, rates)
        ax.plot(
            rates, [100 * a for a in att], style, label=f"{plan.mode.value}: {plan.describe()} ({plan.num_gpus} dev)"
        )
    ax.axhline(100 * searcher.s.target_attainment, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    band = f"; chosen goodput {chosen.describe_band()}" if chosen.band else ""
    ax.set_title(
        f"{searcher.perf.model.name} on {searcher.cluster.name} (simulated){band}\n{result.degrees.short()}",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _plan(args: argparse.Namespace) -> int:
    start = time.monotonic()

    def progress(msg: str) -> None:
        print(f"[plan {time.monotonic() - start:5.1f}s] {msg}", file=sys.stderr, flush=True)

    settings = _settings(args)
    perf = _perf(args)
    whole = tr.load_trace(args.trace)
    reqs = tr.slice_trace(whole, args.trace_start, args.trace_count)
    if len(reqs) < 2:
        raise PlanningError(f"{args.trace}: {len(reqs)} request(s) after --trace-start/--trace-count; need >= 2")
    reqs = tr.scale_lengths(tr.scale_time(reqs, args.time_scale), args.length_scale, args.max_model_len)
    fit, held = tr.split(reqs, 0.5)
    st = tr.stats(reqs)
    progress(
        f"trace {Path(args.trace).name}: {st.count} requests, {st.rate:.2f} req/s, mean prompt "
        f"{st.mean_prompt_len:.0f} / output {st.mean_output_len:.0f} tokens (time ×{args.time_scale:g}, "
        f"length ×{args.length_scale:g}, clipped to {args.max_model_len}); simulations replay samples of "
        f"{min(settings.fit_sample, len(fit))} fit / {min(settings.verify_sample, len(held))} held-out requests"
    )
    searcher = Searcher(perf, fit, held, settings, progress)
    result = searcher.run()
    if args.band_slices:
        # The prediction above rests on one slice of the trace; slices differ. Each plan's goodput
        # on disjoint slices spread over the whole trace gives its band, and the pick its lower bound.
        scaled = tr.scale_lengths(tr.scale_time(whole, args.time_scale), args.length_scale, args.max_model_len)
        if len(scaled) < 20 * args.band_slices:
            raise PlanningError(
                f"{args.trace}: {len(scaled)} requests are too few for --band-slices {args.band_slices} "
                "(at least 20 per slice); lower it, or 0 for no band"
            )
        slices = tr.slices(scaled, args.band_slices, settings.verify_sample)
        progress(
            f"bands: each plan on {len(slices)} disjoint slices of {len(slices[0])} requests over the whole trace "
            f"({len(whole)} requests)"
        )
        result = searcher.with_bands(result, slices)
    out = Path(args.output)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_plan(out, result.chosen, perf, settings, args.model_path)
        png = out.with_suffix(".png")
        plotted = _plot(png, searcher, result, progress)
    except OSError as e:
        raise PlanningError(f"cannot write {out}: {e.strerror}") from None
    c = result.chosen
    print(
        f"model {perf.model.name}, cluster {perf.cluster.name} ({perf.cluster.num_nodes}×{perf.cluster.gpus_per_node}), "
        f"SLO TTFT {settings.slo.ttft_s:g} s / TPOT {settings.slo.tpot_s:g} s, target "
        f"{'max' if settings.rate is None else f'{settings.rate:g} req/s'}"
        f"{', low node affinity' if settings.low_affinity else ''}"
    )
    print(f"parallelism: {result.degrees.describe()}")
    print(f"chosen: {c.mode.value}: {c.describe()} on {c.num_gpus} devices")
    print(
        f"predicted goodput {c.goodput:.3g} req/s ({c.goodput_per_gpu:.3g} per device); attainment {c.attainment:.1%} "
        f"(TTFT {c.ttft_attainment:.1%}, TPOT {c.tpot_attainment:.1%}) at {c.rate:.3g} req/s on held-out requests"
    )
    if c.band is not None:
        print(
            f"goodput over {args.band_slices} slices of the whole trace: {c.describe_band()} "
            f"(picked for the best p10 per device: {c.lower_per_gpu:.3g})"
        )
    for n, names in enumerate(c.nodes):
        print(f"  node {n}: {', '.join(names) if names else '(idle)'}")
    print("ranked plans (simulated on a sample of the trace; verify on the real cluster):")
    print(_table(result.plans))
    print(
        f"wrote {out} and {png}" if plotted else f"wrote {out} (no plot: pip install 'triptych[plot]' for {png.name})"
    )
    if perf.fitted is None:
        print("latency: roofline prior (no profile); pass a `triptych profile` .json as --model to calibrate")
    return 0


def run(args: argparse.Namespace) -> int:
    """Entry point for `triptych plan`; returns the exit code (2 on PlanningError, message on stderr)."""
    try:
        return _plan(args)
    except PlanningError as e:
        print(f"triptych plan: error: {e}", file=sys.stderr)
        return 2
