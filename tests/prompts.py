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
