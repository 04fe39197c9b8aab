"""RULER-style long-context tasks built locally (no downloads), at exact chat-templated lengths.

    make_tasks(tokenizer, length, kinds, count, seed) -> [RulerTask]

A task's prompt is the model's chat template around one user message (instruction, long
context, question) with the generation prompt, then an answer prefix the model continues ("The
pass key is"), as RULER's templates do. Pieces are tokenized separately and concatenated as token
ids, so the filler can be cut to the token and `prompt_ids` has exactly `length` tokens:

    head(system + "user\n") | instruction | filler[:a] needle filler[a:n] | question | tail | prefix

Kinds (after RULER, Hsieh et al. 2024):
  passkey    a 5-digit pass key ("The pass key is 12345. Remember it. ...") in natural text
             (RULER uses repeated noise sentences; SmolLM2-135M then answers nothing useful)
  needle     "One of the special magic numbers for <word> is: <7 digits>." inside natural text
             (stdlib docstrings, as tests/prompts.py); the query names the word
  vartrack   a chain VAR A = <5 digits>, VAR B = VAR A, ... spread through repeated noise
             ("The grass is green. ...") from the depth on, interleaved with a distractor chain
             of another value; which variables equal the value?
  cwe        common-word extraction: a numbered word list where one word takes 1/8 of the
             entries and every other word a few; which word is the most common? (no depth)

Depths (where the needle or first assignment sits) cycle through 10%..90% within a kind.
`score(task, text)` is RULER's string_match_all: every expected string occurs in the output.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

KINDS = ("passkey", "needle", "vartrack", "cwe")
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_KEY_WORDS = (
    "apple",
    "river",
    "violin",
    "castle",
    "orbit",
    "pepper",
    "falcon",
    "meadow",
    "lantern",
    "glacier",
    "copper",
    "harbor",
    "velvet",
    "thunder",
    "saddle",
    "quartz",
)


@dataclass(frozen=True)
class RulerTask:
    kind: str
    depth: float
    prompt_ids: tuple[int, ...]
    answers: tuple[str, ...]  # every one must occur in the output (case-insensitive)

    @property
    def length(self) -> int:
        return len(self.prompt_ids)


def score(task: RulerTask, text: str) -> bool:
    return all(a.lower() in text.lower() for a in task.answers)


def doc_tokens(tokenizer) -> list[int]:
    """The natural filler text (stdlib docstrings, tests/prompts.py corpus) as token ids."""
    from tests.prompts import corpus

    return tokenizer(corpus()).input_ids


def filler(stream: list[int], n: int, start: int = 0) -> list[int]:
    """n tokens of `stream` from `start`, wrapping around."""
    reps = 1 + (start % len(stream) + n) // len(stream)
    return (stream * reps)[start % len(stream) : start % len(stream) + n]


class _Builder:
    """Token-level assembly of chat-templated prompts for one tokenizer."""

    filler = staticmethod(filler)

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        empty = list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": ""}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
        # The user's content goes before the template's last end-of-turn token.
        end = len(empty) - 1 - empty[::-1].index(tokenizer.convert_tokens_to_ids("<|im_end|>"))
        self.head, self.tail = empty[:end], empty[end:]
        self.docs = doc_tokens(tokenizer)
        self.noise = tokenizer(_NOISE * 16).input_ids
        self.newline = tokenizer("\n").input_ids

    def ids(self, text: str) -> list[int]:
        return self.tok(text).input_ids

    def prompt(self, parts: list[list[int]], prefix: str) -> list[int]:
        return self.head + [t for p in parts for t in p] + self.tail + self.ids(prefix)

    def overhead(self, parts: list[list[int]], prefix: str) -> int:
        return len(self.prompt(parts, prefix))


def _passkey(b: _Builder, length: int, depth: float, rng: random.Random) -> RulerTask:
    key = str(rng.randint(10000, 99999))
    intro = b.ids(
        "There is an important info hidden inside a lot of irrelevant text. Find it "
        "and memorize it. I will quiz you about the important info there.\n\n"
    )
    needle = b.ids(f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n")
    question = b.ids("\n\nWhat is the pass key mentioned in the provided text?")
    prefix = "The pass key mentioned in the provided text is"
    n = length - b.overhead([intro, needle, question], prefix)
    a, shift = int(n * depth), rng.randrange(len(b.docs))
    body = [intro, b.filler(b.docs, a, shift), needle, b.filler(b.docs, n - a, shift + a), question]
    return RulerTask("passkey", depth, tuple(b.prompt(body, prefix)), (key,))


def _needle(b: _Builder, length: int, depth: float, rng: random.Random) -> RulerTask:
    word = rng.choice(_KEY_WORDS)
    value = str(rng.randint(1000000, 9999999))
    intro = b.ids(
        "Some special magic numbers are hidden within the following text. Make sure "
        "to memorize it. I will quiz you about the numbers afterwards.\n\n"
    )
    needle = b.ids(f"\nOne of the special magic numbers for {word} is: {value}.\n")
    question = b.ids(f"\n\nWhat is the special magic number for {word} mentioned in the provided text?")
    prefix = f"The special magic number for {word} mentioned in the provided text is"
    n = length - b.overhead([intro, needle, question], prefix)
    a, shift = int(n * depth), rng.randrange(len(b.docs))
    body = [intro, b.filler(b.docs, a, shift), needle, b.filler(b.docs, n - a, shift + a), question]
    return RulerTask("needle", depth, tuple(b.prompt(body, prefix)), (value,))


def _var_names(rng: random.Random, count: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    return names


def _vartrack(b: _Builder, length: int, depth: float, rng: random.Random, hops: int = 3) -> RulerTask:
    names = _var_names(rng, 2 * (hops + 1))
    value, other = rng.sample(range(10000, 99999), 2)
    chain, decoy = names[: hops + 1], names[hops + 1 :]

    def assignments(vars_, val):
        return [f"VAR {vars_[0]} = {val}."] + [f"VAR {vars_[i]} = VAR {vars_[i - 1]}." for i in range(1, len(vars_))]

    stmts = [b.ids(f" {s} ") for pair in zip(assignments(chain, value), assignments(decoy, other)) for s in pair]
    intro = b.ids("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n")
    question = b.ids(f"\n\nQuestion: Find all variables that are assigned the value {value} in the text above.")
    prefix = (
        f"Answer: According to the chain(s) of variable assignment in the text above, "
        f"{hops + 1} variables are assigned the value {value}, they are:"
    )
    n = length - b.overhead([intro, *stmts, question], prefix)
    first = int(n * depth)
    gap = (n - first) // (len(stmts) + 1)
    body, pos = [intro, b.filler(b.noise, first)], first
    for s in stmts:
        body += [s, b.filler(b.noise, gap, pos)]
        pos += gap
    body += [b.filler(b.noise, n - pos, pos), question]
    return RulerTask("vartrack", depth, tuple(b.prompt(body, prefix)), tuple(chain))


def _cwe_words(b: _Builder) -> list[str]:
    """Lower-case words of the docstring corpus that are one token after a space."""
    from tests.prompts import corpus

    seen: dict[str, None] = {}
    for w in corpus().split():
        w = w.strip(".,;:()[]'\"`").lower()
        if w.isalpha() and 4 <= len(w) <= 9 and len(b.ids(" " + w)) == 1:
            seen.setdefault(w, None)
    return sorted(seen)


def _cwe(b: _Builder, words: list[str], length: int, depth: float, rng: random.Random) -> RulerTask:
    top = rng.choice(words)
    others = [w for w in words if w != top]
    rng.shuffle(others)
    intro = b.ids(
        "Below is a numbered list of words. In these words, one word appears much "
        "more often than the others. Memorize it.\n\n"
    )
    question = b.ids("\n\nQuestion: What is the most common word in the above list? Answer with one word.")
    prefix = "Answer: The most common word in the list is"
    budget = length - b.overhead([intro, question], prefix)
    entries, used = [], 0
    while True:  # entries are appended in a seeded order until the next would not fit
        w = top if len(entries) % 8 == 3 else others[len(entries) % len(others)]
        e = b.ids(f"{len(entries) + 1}. {w}\n")
        if used + len(e) > budget:
            break
        entries.append(e)
        used += len(e)
    pad = b.newline * (budget - used)
    return RulerTask("cwe", depth, tuple(b.prompt([intro, *entries, pad, question], prefix)), (top,))


def make_tasks(
    tokenizer, length: int, kinds: tuple[str, ...] = KINDS, count: int = 5, seed: int = 0
) -> list[RulerTask]:
    """`count` tasks of each kind at exactly `length` tokens; depths cycle through DEPTHS."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown task kinds {sorted(unknown)}; known: {KINDS}")
    b = _Builder(tokenizer)
    words = _cwe_words(b)
    out = []
    for kind in kinds:
        rng = random.Random(f"{seed}-{length}-{kind}")
        for i in range(count):
            depth = DEPTHS[i % len(DEPTHS)]
            if kind == "passkey":
                out.append(_passkey(b, length, depth, rng))
            elif kind == "needle":
                out.append(_needle(b, length, depth, rng))
            elif kind == "vartrack":
                out.append(_vartrack(b, length, depth, rng))
            else:
                out.append(_cwe(b, words, length, depth, rng))
    return out
