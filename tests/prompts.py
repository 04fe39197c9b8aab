"""Deterministic natural-language prompts of chosen token lengths, built from stdlib docstrings."""

from __future__ import annotations

import argparse
import collections
import json
import logging
import pathlib
import subprocess
import textwrap
import threading
import unittest

_SOURCES = [argparse, collections, json, logging, pathlib, subprocess, textwrap, threading, unittest]
QUESTIONS = [
    "Summarize the text above in two sentences.",
    "What is the main topic of this text?",
    "List three key terms from the text.",
    "Explain this to a beginner.",
]


def corpus() -> str:
    return "\n\n".join((m.__doc__ or "").strip() for m in _SOURCES)


def user_text(tokenizer, n_tokens: int, shift: int = 0) -> str:
    """About n_tokens tokens of text, starting `shift` tokens into the corpus."""
    ids = tokenizer(corpus()).input_ids
    while len(ids) < shift + n_tokens:
        ids = ids + ids
    return tokenizer.decode(ids[shift : shift + n_tokens])


def chat_prompts(tokenizer, lengths: list[int]) -> list[list[dict]]:
    """One chat (a user message of ~length tokens + a question) per length."""
    out = []
    for i, n in enumerate(lengths):
        body = user_text(tokenizer, n, shift=97 * i)
        out.append([{"role": "user", "content": f"{body}\n\n{QUESTIONS[i % len(QUESTIONS)]}"}])
    return out


def shared_prefix_prompts(vocab: int) -> list[list[int]]:
    """20 prompts: groups sharing prefixes of 0, 13 (mid-block), 32 (whole blocks) and 47 tokens,
    one prompt that is exactly another's prefix, one that repeats another whole."""
    import torch

    gen = torch.Generator().manual_seed(3)
    rand = lambda n: torch.randint(3, vocab, (n,), generator=gen).tolist()  # noqa: E731
    prompts = []
    for shared in (0, 13, 32, 47):
        base = rand(shared)
        prompts += [base + rand(n) for n in (5, 11, 16, 29)]
    prompts.append(prompts[5][:13])  # the whole prompt is another's prefix (ends mid-block)
    prompts.append(list(prompts[9]))  # the same prompt again
    prompts += [rand(40), rand(8)]
    return prompts
