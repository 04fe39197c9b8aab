"""Encode → prefill → decode on a local Ray: a tiny seeded LLaVA served by 2 encode workers,
1 prefill and 1 decode worker, image features and KV over shared memory.

Greedy tokens of one-image, two-image, chat-with-image and text-only requests (run at once)
equal LlavaForConditionalGeneration.generate() on the same weights and images; a bad image is
refused up front naming the image; nothing leaks. A killed encode worker is restarted by the
supervisor and serves again.

The same checks without an encode pool (`pools.encode.workers: 0`, and colocated mode): the
prefill / colocated worker loads the vision tower itself and encodes the images it is sent.
"""

from __future__ import annotations

import time

import pytest
import torch

from cluster.config import parse_config
from cluster.controller import start_router
from cluster.router_api import ChatMessage, ErrorKind, GenerateInput, RouterError
from engine.worker_api import Role
from engine import multimodal
from engine.sequence import FinishReason, SamplingParams
from tests.helpers.router import LoopThread, assert_no_leaks, assert_no_segments, collect, run_all
from tests.helpers.llava import IMAGE_TOKEN_ID, build_tiny_llava, png_bytes

pytestmark = pytest.mark.slow

NEW_TOKENS = 12
TOKENS_PER_IMAGE = 16


@pytest.fixture(scope="module")
def llava():
    return build_tiny_llava(seed=5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, llava):
    """The LLaVA checkpoint + the SmolLM2 tokenizer, its token IMAGE_TOKEN_ID marked special so
    the image token's text tokenizes to exactly that id (as `<image>` does in real LLaVA)."""
    from transformers import AutoTokenizer

    from engine import model_loader

    path = tmp_path_factory.mktemp("tiny-llava-epd")
    llava.save_pretrained(path)
    tok = AutoTokenizer.from_pretrained(model_loader.local_dir(model_loader.resolve(None)))
    tok.add_special_tokens({"additional_special_tokens": [tok.convert_ids_to_tokens(IMAGE_TOKEN_ID)]})
    assert len(tok) == llava.config.text_config.vocab_size
    tok.save_pretrained(path)
    return str(path)


def reference(llava, ids: list[int], images: list[bytes]) -> list[int]:
    """transformers generate() greedy on the expanded prompt, the processor's pixels fed to LLaVA."""
    full = multimodal.expand_image_tokens(ids, IMAGE_TOKEN_ID, len(images), TOKENS_PER_IMAGE)
    kwargs = {"pixel_values": multimodal.ImageProcessor.from_config(llava.config)(images)} if images else {}
    text_config = llava.config.text_config
    saved = text_config._attn_implementation
    text_config._attn_implementation = "sdpa"
    try:
        with torch.inference_mode():
            out = llava.generate(
                torch.tensor([full]),
                attention_mask=torch.ones(1, len(full), dtype=torch.long),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=[2],
                pad_token_id=2,
                **kwargs,
            )
    finally:
        text_config._attn_implementation = saved
    return out[0, len(full) :].tolist()


def deploy(model_dir: str, **overrides):
    config = parse_config(
        {
            "version": 1,
            "model": {"path": model_dir, "max_model_len": 1024},
            "ray": {"num_cpus": 4},
            "pools": {"encode": {"workers": 2}},
        },
        "test_epd_ray",
        overrides=overrides,
    )
    loop = LoopThread()
    return loop, loop.run(start_router(config))


def request(rid: str, ids: list[int] | None = None, images=(), messages=None) -> GenerateInput:
    return GenerateInput(
        rid,
        SamplingParams(max_tokens=NEW_TOKENS),
        token_ids=tuple(ids) if ids else None,
        images=tuple(images),
        messages=messages,
    )


def vision_calls(handle) -> int | None:
    """Vision forwards run inside a prefill / colocated worker; None when it holds no vision tower."""
    import ray

    def probe(actor):
        core = actor.impl.core  # the worker actor's inner worker's core
        return None if core.image_encoder is None else core.image_encoder.calls

    return ray.get(handle.actor.__ray_call__.remote(probe), timeout=60)


def check_epd(loop, router, llava, roles=("decode", "encode", "encode", "prefill"), encode_timed=True):
    """encode_timed: the request's timings report image encoding (not in colocated mode)."""
    info = router.model_info()
    assert info.supports_images
    status = loop.run(router.cluster_status())
    assert sorted(w.role.value for w in status.workers) == list(roles)
    assert all(w.alive for w in status.workers)

    img = [png_bytes(40 + i) for i in range(4)]
    one = [5, 17, 300, IMAGE_TOKEN_ID, 99, 1024, 7]
    two = [IMAGE_TOKEN_ID, 12, 13, IMAGE_TOKEN_ID, 4000, 41, 42]
    text = [8, 9, 10, 11, 12000, 13, 14, 15]
    chat = (ChatMessage("user", "Describe the picture.", (img[3],)),)
    chat_ids = router.apply_chat_template(chat)
    assert chat_ids.count(IMAGE_TOKEN_ID) == 1
    cases = [
        (request("one", one, img[:1]), one, img[:1]),
        (request("two", two, img[1:3]), two, img[1:3]),
        (request("text", text), text, []),
        (request("chat", messages=chat), chat_ids, img[3:]),
    ]
    results = loop.run(run_all(router, [c[0] for c in cases]))
    assert all(r.final.error is None for r in results), [r.final.error for r in results]
    for (req, ids, images), r in zip(cases, results):
        assert r.token_ids == reference(llava, ids, images), req.request_id
        assert r.final.prompt_tokens == len(ids) + len(images) * (TOKENS_PER_IMAGE - 1)
        if encode_timed:
            assert (r.final.timings.encode_s > 0) == bool(images), req.request_id
    assert len(set(results[0].token_ids)) > 3  # seeded weights give varied greedy tokens
    assert_no_leaks(loop, router)

    async def submit(req):
        return router.generate(req)

    with pytest.raises(RouterError) as err:
        loop.run(submit(request("bad", two, [img[0], b"\x89PNG not really"])))
    assert err.value.kind is ErrorKind.INVALID_ARGUMENT and "image 1" in err.value.message
    with pytest.raises(RouterError) as err:  # one image token, two images
        loop.run(submit(request("mismatch", one, img[:2])))
    assert err.value.kind is ErrorKind.INVALID_ARGUMENT
    again = loop.run(collect(router, request("again", one, img[:1])))
    assert again.final.finish_reason is not FinishReason.ERROR and again.token_ids == results[0].token_ids
    assert_no_leaks(loop, router)


def check_image_caching(loop, router, llava):
    """Prefix caching keys an image's blocks by its content, end to end (encode, prefill, decode):
    the same token ids with another image reuse only the text blocks before it; with the same
    image every full block; each answer is transformers' for its own image."""
    bs = router.dispatch.prefix_index.block_size
    ids = list(range(300, 300 + bs + 2)) + [IMAGE_TOKEN_ID, 99, 1024, 7]  # one text block, then the image
    full = len(ids) + TOKENS_PER_IMAGE - 1
    a, b = png_bytes(80), png_bytes(81)
    first = loop.run(collect(router, request("img-a", ids, [a])))
    other = loop.run(collect(router, request("img-b", ids, [b])))
    same = loop.run(collect(router, request("img-a-again", ids, [a])))
    assert [r.final.error for r in (first, other, same)] == [None] * 3
    assert first.token_ids == same.token_ids == reference(llava, ids, [a])
    assert other.token_ids == reference(llava, ids, [b]) != first.token_ids
    assert (other.final.cached_tokens, same.final.cached_tokens) == (bs, (full - 1) // bs * bs)
    assert_no_leaks(loop, router)


def check_encode_restart(loop, router, llava):
    """Kill an encode worker: the supervisor starts a replacement (epoch 1) and images flow again."""
    import ray

    victim = router.encode[0]
    ray.kill(victim.actor)
    # A replacement is a fresh Ray worker process importing torch and loading the vision tower:
    # ~10 s on a quiet 2-core machine, minutes when other jobs load every core.
    deadline = time.monotonic() + 240
    while not (router.encode[0] is not victim and router.encode[0].alive) and time.monotonic() < deadline:
        time.sleep(0.2)
    new = router.encode[0]
    assert new is not victim and new.alive and new.epoch == 1, (new, victim, list(router.supervisor.history))
    assert router.supervisor.restarts().get(victim.worker_id) == 1
    status = loop.run(router.cluster_status())
    assert {(w.worker_id, w.epoch, w.alive) for w in status.workers if w.role is Role.ENCODE} == {
        (victim.worker_id, 1, True),
        (router.encode[1].worker_id, 0, True),
    }
    ids = [IMAGE_TOKEN_ID, 12, IMAGE_TOKEN_ID, 4000, 41, 42]
    images = [png_bytes(70), png_bytes(71)]  # new images: both workers encode, none cached
    r = loop.run(collect(router, request("after-restart", ids, images)))
    assert r.final.error is None and r.token_ids == reference(llava, ids, images)
    assert_no_leaks(loop, router)


def test_epd_one_node(model_dir, llava):
    loop, router = deploy(model_dir, **{"engine.prefix_caching": True})
    try:
        check_epd(loop, router, llava)
        check_image_caching(loop, router, llava)
        assert vision_calls(router.prefill[0]) is None  # an encode pool: no vision tower in prefill
        # Without role_switching.encode_prefill neither side holds the other's weights: refused
        # before any draining, saying why.
        for worker_id, role, held in (
            ("encode-0", Role.PREFILL, "only the vision tower"),
            ("prefill-0", Role.ENCODE, "no vision tower"),
        ):
            with pytest.raises(RouterError, match=f"cannot take the {role.value} role: it holds {held}") as err:
                loop.run(router.set_worker_role(worker_id, role))
            assert err.value.kind is ErrorKind.FAILED_PRECONDITION
        assert router.switch_count == 0 and all(w.serving for w in router.encode + router.prefill)
        check_encode_restart(loop, router, llava)
    finally:
        loop.run(router.shutdown())
        loop.close()
    assert_no_segments()


def test_epd_encode_on_another_simulated_node(model_dir, llava):
    """Encode workers on their own node (only it offers the `encode` resource); shm still works
    because simulated nodes share /dev/shm."""
    import ray
    from ray.cluster_utils import Cluster

    sim = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"prefill": 1, "decode": 1}})
    sim.add_node(num_cpus=2, resources={"encode": 2})
    loop = None
    try:
        ray.init(address=sim.address, log_to_driver=False)
        loop, router = deploy(model_dir)
        try:
            status = loop.run(router.cluster_status())
            nodes = {w.role: w.node_id for w in status.workers}
            enc_nodes = {w.node_id for w in status.workers if w.role is Role.ENCODE}
            assert len(enc_nodes) == 1 and nodes[Role.PREFILL] not in enc_nodes
            check_epd(loop, router, llava)
        finally:
            loop.run(router.shutdown())
    finally:
        if loop is not None:
            loop.close()
        ray.shutdown()
        sim.shutdown()


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_images_without_an_encode_pool(model_dir, llava, mode):
    """No encode workers: the router sends the image bytes to the prefill worker (or the colocated
    worker), which encodes them itself. Same greedy tokens as transformers, same clear refusal
    of a bad image, nothing leaks."""
    overrides = {"pools.encode.workers": 0} if mode == "disaggregated" else {"mode": "colocated"}
    loop, router = deploy(model_dir, **overrides)
    try:
        assert router.encode == []
        roles = ("decode", "prefill") if mode == "disaggregated" else ("colocated",)
        check_epd(loop, router, llava, roles=roles, encode_timed=mode == "disaggregated")
        worker = router.prefill[0] if mode == "disaggregated" else router.decode[0]
        assert vision_calls(worker) >= 1  # the images were encoded in that worker
    finally:
        loop.run(router.shutdown())
        loop.close()
    assert_no_segments()


def test_encode_prefill_role_switching(model_dir, llava):
    """`role_switching.encode_prefill`: encode and prefill workers hold both halves of the model.
    An encode worker moves to prefill and back (and the prefill worker to encode) on a live
    cluster without reloading a weight; answers stay equal to transformers' before, between and
    after; impossible moves are refused up front with the reason."""
    import ray

    loop, router = deploy(model_dir, **{"role_switching.encode_prefill": True})

    def weights(handle):
        """Addresses of the worker's first language and vision weight tensors (a reload would move them)."""

        def probe(actor):
            return (
                next(actor.loaded.model.parameters()).data_ptr(),
                None if actor.vision is None else next(actor.vision.vision.parameters()).data_ptr(),
            )

        return ray.get(handle.actor.__ray_call__.remote(probe), timeout=60)

    def serve(tag: str):
        img = [png_bytes(90 + i) for i in range(3)]
        cases = [
            ([5, IMAGE_TOKEN_ID, 99, 1024, 7], img[:1]),
            ([IMAGE_TOKEN_ID, 12, IMAGE_TOKEN_ID, 41], img[1:]),
            ([8, 9, 10, 11, 12000], []),
            ([IMAGE_TOKEN_ID, 300, 301], img[2:]),
        ]
        results = loop.run(
            run_all(router, [request(f"{tag}-{i}", ids, images) for i, (ids, images) in enumerate(cases)])
        )
        for (ids, images), r in zip(cases, results):
            assert r.final.error is None and r.token_ids == reference(llava, ids, images), (tag, r.final.error)
        assert_no_leaks(loop, router)

    try:
        before = {h.worker_id: weights(h) for h in router.encode + router.prefill}
        assert all(v is not None for w in before.values() for v in w)  # both halves everywhere
        serve("start")
        s = loop.run(router.set_worker_role("encode-1", Role.PREFILL, "test"))
        assert (s.from_role, s.to_role, s.epoch) == (Role.ENCODE, Role.PREFILL, 1)
        assert [w.worker_id for w in router.encode] == ["encode-0"]
        assert sorted(w.worker_id for w in router.prefill) == ["encode-1", "prefill-0"]
        serve("two-prefill")  # 1 encode, 2 prefill workers (one of them was encode-1)

        def refused(worker_id, role, match):
            with pytest.raises(RouterError, match=match) as err:
                loop.run(router.set_worker_role(worker_id, role))
            assert err.value.kind is ErrorKind.FAILED_PRECONDITION

        refused("encode-0", Role.PREFILL, "last live encode worker")
        refused("decode-0", Role.ENCODE, "move it to prefill first")
        s = loop.run(router.set_worker_role("prefill-0", Role.ENCODE, "test"))
        assert (s.from_role, s.to_role) == (Role.PREFILL, Role.ENCODE)
        serve("prefill-as-encode")  # encode-0 and prefill-0 encode, encode-1 (switched) prefills all
        loop.run(router.set_worker_role("prefill-0", Role.PREFILL, "test"))
        loop.run(router.set_worker_role("encode-1", Role.ENCODE, "test"))
        serve("back")
        after = {h.worker_id: weights(h) for h in router.encode + router.prefill}
        assert after == before  # the same tensors: nothing was loaded again
        status = loop.run(router.cluster_status())
        assert status.switch_count == 4
        assert sorted((w.worker_id, w.role.value, w.epoch) for w in status.workers) == [
            ("decode-0", "decode", 0),
            ("encode-0", "encode", 0),
            ("encode-1", "encode", 2),
            ("prefill-0", "prefill", 2),
        ]
    finally:
        loop.run(router.shutdown())
        loop.close()
    assert_no_segments()


def test_encode_prefill_needs_a_vision_language_model():
    from cluster.config import ConfigError

    config = parse_config(
        {"version": 1, "pools": {"encode": {"workers": 1}}, "role_switching": {"encode_prefill": True}}, "text-only"
    )
    loop = LoopThread()
    try:
        with pytest.raises(ConfigError, match="has no vision tower"):
            loop.run(start_router(config))
    finally:
        loop.close()
