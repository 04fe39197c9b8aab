"""Rank 0 of a tensor-parallel worker waits for its followers to join, watching them: a follower
that ends first fails the start at once with its reason (cluster/tp_group.py `join_watching`)."""

import threading
import time

import pytest

from cluster.tp_group import join_watching, rank_share


def test_a_follower_that_fails_to_start_fails_the_join_at_once():
    never = threading.Event()
    ended = iter([None, None, "rank 1 of tensor-parallel worker colocated-0 died (DeviceError: no GPU on node n1)"])
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="could not form: rank 1 .* died \\(DeviceError: no GPU on node n1\\)"):
        join_watching(lambda: never.wait(60), lambda: next(ended), poll_s=0.01)
    assert time.monotonic() - t0 < 5  # not the rendezvous timeout


def test_join_returns_the_group_or_its_error():
    assert join_watching(lambda: "group", lambda: None, poll_s=0.01) == "group"

    def broken():
        raise TimeoutError("rendezvous timed out")

    with pytest.raises(TimeoutError, match="rendezvous timed out"):
        join_watching(broken, lambda: None, poll_s=0.01)


def test_a_rank_reserves_its_share_of_the_worker():
    assert rank_share(3.0, 3.0, {"colocated": 1.0}, 3) == {"CPU": 1.0, "GPU": 1.0, "colocated": 1 / 3}
    assert rank_share(2.0, 0.0, {}, 2) == {"CPU": 1.0}
