"""Decode-side KV selection quality on the real SmolLM2-135M: multi-turn long-context tasks.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.multiturn_quality [--lengths 4096,8000] [--count 10]
        [--methods loopserve,snapkv,streaming,quest] [--budgets 0.25,0.5] [--max-tokens 12]

Each task is a conversation built locally (no downloads) of about `length` tokens after the chat
template: two long user turns of natural text (stdlib docstrings, as bench/ruler.py), each
answered by a short assistant turn, then a final user message of more text with a question. Two
facts are planted: a locker's 5-digit pass key inside the first user turn's text and a project's
meeting city in the first assistant turn. The question asks for one of them (alternating), and
sits at the start, the middle or the end of the final user message (cycling: LoopServe's
benchmark shows that position matters). The answer prefix ("The pass key for the <w> locker is", "The <w> project will meet in")
follows the generation prompt, as RULER's templates do.

Then a follow-up turn that depends on the model's own earlier answer: that answer is appended as
the assistant's turn and the user asks to repeat it; it is right when it repeats that answer's
first word (the number or the city; the planted one when the answer had none).

Every method runs on the same engine with prefix caching on, so the long history is prefilled
once (dense: selection is decode-side) and each method decodes from the same KV. Per method and
kept-KV budget: answers right, answers lost vs dense (dense right, method wrong), and greedy text
identical to dense, for the questions and the follow-ups.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from dataclasses import dataclass, field

from bench.ruler import _KEY_WORDS, doc_tokens, filler

POSITIONS = ("start", "middle", "end")


@dataclass(frozen=True)
class Task:
    length: int
    position: str
    asks: str  # "user" (the locker's pass key) or "assistant" (the project's city)
    messages: tuple[dict, ...]
    prefix: str
    answer: str


def _text(tokenizer, docs: list[int], start: int, n: int) -> str:
    return tokenizer.decode(filler(docs, n, start))


def _prompt_ids(tokenizer, messages, prefix: str) -> list[int]:
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids) + tokenizer(prefix).input_ids


CITIES = ("Lisbon", "Nairobi", "Oslo", "Lima", "Hanoi", "Dublin", "Quito", "Tunis", "Perth", "Riga", "Accra", "Bern")


def make_task(tokenizer, docs, length: int, i: int, rng: random.Random) -> Task:
    """Two facts of different kinds (so that a small model does not swap them): a locker's pass
    key in the first user turn, a project's meeting city in the first assistant turn."""
    w1, w2 = rng.sample(_KEY_WORDS, 2)
    key, city = str(rng.randint(10000, 99999)), rng.choice(CITIES)
    asks = "user" if i % 2 == 0 else "assistant"
    position = POSITIONS[i % len(POSITIONS)]
    if asks == "user":
        question = f"What is the pass key for the {w1} locker that I mentioned in my first message?"
        prefix, answer = f"The pass key for the {w1} locker is", key
    else:
        question = f"In which city will the {w2} project meet, as you told me earlier?"
        prefix, answer = f"The {w2} project will meet in", city
    shift = rng.randrange(len(docs))
    depth = rng.uniform(0.1, 0.9)  # where the pass key sits in the first user turn

    def build(n: int) -> tuple[dict, ...]:
        a, b, c = int(n * 0.4), int(n * 0.35), n - int(n * 0.4) - int(n * 0.35)
        t1 = _text(tokenizer, docs, shift, a)
        cut = int(len(t1) * depth)
        cut = t1.rfind(" ", 0, cut) if t1.rfind(" ", 0, cut) > 0 else cut
        user1 = (
            "Please read this document carefully.\n\n"
            + t1[:cut]
            + f"\nThe pass key for the {w1} locker is {key}. Remember it.\n"
            + t1[cut:]
        )
        assistant1 = f"I have read it. Please also note for later: the {w2} project will meet in {city}."
        user2 = "Here is another document.\n\n" + _text(tokenizer, docs, shift + a, b)
        assistant2 = "Understood. I have read the second document."
        t3 = _text(tokenizer, docs, shift + a + b, c)
        if position == "start":
            final = f"{question}\n\n{t3}\n\nAnswer the question I asked at the start of this message."
        elif position == "middle":
            half = t3.rfind(" ", 0, len(t3) // 2)
            final = f"{t3[:half]}\n\n{question}\n\n{t3[half:]}\n\nAnswer the question in the middle of this message."
        else:
            final = f"{t3}\n\n{question}"
        return (
            {"role": "user", "content": user1},
            {"role": "assistant", "content": assistant1},
            {"role": "user", "content": user2},
            {"role": "assistant", "content": assistant2},
            {"role": "user", "content": final},
        )

    n = length - 200
    for _ in range(6):  # fit the filler to the length (tokens of decoded text are not additive)
        messages = build(n)
        got = len(_prompt_ids(tokenizer, messages, prefix))
        if length - 40 <= got <= length:
            break
        n += length - 20 - got
    return Task(length, position, asks, messages, prefix, answer)


@dataclass
class Row:
    name: str
    texts: list[str] = field(default_factory=list)
    right: list[bool] = field(default_factory=list)
    follow_texts: list[str] = field(default_factory=list)
    follow_right: list[bool] = field(default_factory=list)
    decode_s: float = 0.0
    density: list[float] = field(default_factory=list)


def _said(text: str) -> str | None:
    """The answer a text gives: its first word (a number or a name), without punctuation."""
    m = re.search(r"[A-Za-z0-9]+", text.replace(",", ""))
    return m.group(0) if m else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4096,8000", help="conversation lengths (tokens, chat template included)")
    p.add_argument("--count", type=int, default=10, help="tasks per length")
    p.add_argument("--methods", default="loopserve,snapkv,streaming,quest")
    p.add_argument("--budgets", default="0.25,0.5", help="kept-KV budgets (share of the blocks)")
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--rescore-every", type=int, default=16)
    p.add_argument("--gamma", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)

    import torch

    from engine.config import EngineConfig
    from engine.kv_select.config import KVSelectionConfig
    from engine.llm_engine import LLMEngine, LoadedModel
    from engine.sequence import SamplingParams

    torch.set_num_threads(1)
    loaded = LoadedModel.load(None)
    tok = loaded.tokenizer
    lengths = [int(x) for x in args.lengths.split(",")]
    engine = LLMEngine(
        EngineConfig(block_size=16, num_kv_blocks=1400, max_num_batched_tokens=2048, prefix_caching=True), loaded
    )
    docs = doc_tokens(tok)
    budgets = [float(b) for b in args.budgets.split(",")]
    methods = [("dense", None)] + [
        (
            f"{m} {b:.0%}",
            KVSelectionConfig(
                method=m, budget=b, min_budget=min(0.1, b), gamma=args.gamma, rescore_every=args.rescore_every
            ),
        )
        for b in budgets
        for m in args.methods.split(",")
    ]
    rows = {name: Row(name) for name, _ in methods}
    params = SamplingParams(max_tokens=args.max_tokens)
    t0 = time.monotonic()
    tasks = []
    for length in lengths:
        rng = random.Random(f"{args.seed}-{length}")
        tasks += [make_task(tok, docs, length, i, rng) for i in range(args.count)]
    print(f"{len(tasks)} tasks built in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    for ti, task in enumerate(tasks):
        ids = _prompt_ids(tok, task.messages, task.prefix)
        for name, cfg in methods:
            engine.set_kv_selection(cfg)
            t = time.monotonic()
            text = engine.generate([ids], params)[0].text
            row = rows[name]
            row.decode_s += time.monotonic() - t
            row.texts.append(text)
            row.right.append(task.answer.lower() in text.replace(",", "").lower())
            if engine.selector is not None:
                row.density.append(engine.selector.stats.density)
            # the follow-up: this method's own answer becomes the assistant's turn; right when it
            # repeats that answer
            said = _said(text) or task.answer
            follow = task.messages + (
                {"role": "assistant", "content": f"{task.prefix}{text}"},
                {"role": "user", "content": "Please repeat your answer."},
            )
            engine.set_kv_selection(cfg)
            ftext = engine.generate([_prompt_ids(tok, follow, task.prefix)], params)[0].text
            row.follow_texts.append(ftext)
            row.follow_right.append(said.lower() in ftext.replace(",", "").lower())
            if args.verbose:
                print(f"  task {ti} {name}: {text!r} / {ftext!r}", file=sys.stderr)
        dense = rows["dense"]
        print(
            f"[{time.monotonic() - t0:5.0f}s] task {ti + 1}/{len(tasks)} ({task.length} tokens, question at the "
            f"{task.position}, fact in the {task.asks} turn): dense {'right' if dense.right[-1] else 'wrong'} "
            f"{dense.texts[-1]!r}",
            file=sys.stderr,
            flush=True,
        )
    engine.set_kv_selection(None)
    print(report(rows, tasks, args))
    return 0


def report(rows: dict[str, Row], tasks: list[Task], args) -> str:
    dense = rows["dense"]
    n = len(tasks)
    lines = [
        f"{n} tasks ({args.count} per length {args.lengths}), greedy, {args.max_tokens} new tokens; "
        f"loopserve R={args.rescore_every}, gamma={args.gamma}",
        "",
        "| method | budget | density | right | lost vs dense | same text as dense | follow-up right | follow-up lost | decode s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        method, _, budget = name.partition(" ")
        lost = sum(d and not m for d, m in zip(dense.right, row.right))
        flost = sum(d and not m for d, m in zip(dense.follow_right, row.follow_right))
        same = sum(a == b for a, b in zip(dense.texts, row.texts))
        density = f"{sum(row.density) / len(row.density):.2f}" if row.density else "1.00"
        lines.append(
            f"| {method} | {budget or '100%'} | {density} | {sum(row.right)}/{n} | {lost} | {same}/{n} | "
            f"{sum(row.follow_right)}/{n} | {flost} | {row.decode_s:.0f} |"
        )
    lines.append("")
    for length in sorted({t.length for t in tasks}):
        for pos in POSITIONS:
            idx = [i for i, t in enumerate(tasks) if t.length == length and t.position == pos]
            if idx:
                lines.append(
                    f"{length} tokens, question at the {pos}: "
                    + ", ".join(f"{name} {sum(rows[name].right[i] for i in idx)}/{len(idx)}" for name in rows)
                )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
