"""Both doors refuse a request by its size before parsing it (parsing holds the interpreter lock
for tens of ms at 30 MB): what a request holds besides its images must fit a request without
images (limits.text_request_bytes). The gRPC door finds its images, messages and content parts by
walking the wire format (gateway_proto._check_shape), the HTTP door its data URLs with
bytes.find (openai_request.data_url_bytes); images of an image model are not counted as text."""

from __future__ import annotations

import base64
import json

import pytest

from cluster import limits as caps
from cluster.config import LimitsConfig
from cluster.gateway_proto import parse_request
from cluster.openai_request import data_url_bytes, parse_body
from cluster.router_api import RouterError
from protos.triptych.v1 import triptych_pb2 as pb

LIMITS = LimitsConfig(max_prompt_chars=1000, max_messages=8, max_images=2, max_image_bytes=1 << 20)
TEXT_CAP = caps.text_request_bytes(LIMITS)
IMAGE = bytes(range(256)) * (3 * TEXT_CAP // 256)  # larger than any text request, within max_image_bytes


def _refusal(fn, *args) -> str:
    with pytest.raises(RouterError) as err:
        fn(*args)
    return err.value.message


def _chat(messages: list[pb.ChatMessage]) -> bytes:
    return pb.GenerateRequest(chat=pb.ChatMessages(messages=messages)).SerializeToString()


def test_grpc_text_beyond_any_acceptable_request_is_refused_by_its_size():
    raw = pb.GenerateRequest(prompt="x" * (2 * TEXT_CAP)).SerializeToString()
    assert _refusal(parse_request, raw, LIMITS, True).startswith(
        f"request bytes besides images: {len(raw)}; the limit is {TEXT_CAP}"
    )
    assert _refusal(parse_request, raw, LIMITS, False).startswith(f"request bytes: {len(raw)}")
    # below the size, the prompt's characters are counted (after the full parse)
    short = pb.GenerateRequest(prompt="x" * 1001).SerializeToString()
    assert parse_request(short, LIMITS, True).prompt == "x" * 1001


def test_grpc_images_are_not_counted_as_text():
    top = pb.GenerateRequest(prompt="Hi", images=[pb.Image(data=IMAGE)]).SerializeToString()
    assert len(top) > TEXT_CAP and parse_request(top, LIMITS, True).images[0].data == IMAGE
    part = pb.ContentPart(image=pb.Image(data=IMAGE, mime_type="image/png"))
    chat = _chat([pb.ChatMessage(role="user", content=[pb.ContentPart(text="Hi"), part])])
    assert parse_request(chat, LIMITS, True).chat.messages[0].content[1].image.data == IMAGE
    assert _refusal(parse_request, chat, LIMITS, False).startswith("request bytes:")  # a text-only model
    # the images are counted across the request: top-level ones and those of every message
    three = _chat([pb.ChatMessage(role="user", content=[part])] * 3)
    assert (
        _refusal(parse_request, three, LIMITS, True) == "images: more than 2; the limit is 2 (server.limits.max_images)"
    )


def test_grpc_counts_stop_past_the_limit():
    many = _chat([pb.ChatMessage(role="user", content=[pb.ContentPart(text="x")])] * 100_000)
    assert _refusal(parse_request, many, LIMITS, True).startswith("messages: more than 8; the limit is 8")
    parts = _chat([pb.ChatMessage(role="user", content=[pb.ContentPart(text="x")] * 100)])
    assert _refusal(parse_request, parts, LIMITS, True).startswith(
        f"content parts: more than {caps.max_content_parts(LIMITS)}"
    )
    exactly = _chat([pb.ChatMessage(role="user", content=[pb.ContentPart(text="x")])] * 8)
    assert len(parse_request(exactly, LIMITS, True).chat.messages) == 8


@pytest.mark.parametrize("cut", [1, 2, 5])
def test_grpc_malformed_bytes_are_refused(cut):
    raw = pb.GenerateRequest(prompt="hello", images=[pb.Image(data=b"abc")]).SerializeToString()
    assert _refusal(parse_request, raw[:-cut], LIMITS, True) == "the request is not a valid GenerateRequest message"
    assert _refusal(parse_request, b"\xff" * 12, LIMITS, True) == "the request is not a valid GenerateRequest message"


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_http_text_beyond_any_acceptable_request_is_refused_by_its_size():
    raw = json.dumps({"prompt": "x" * (2 * TEXT_CAP)}).encode()
    assert _refusal(parse_body, raw, LIMITS, True).startswith(f"request bytes besides images: {len(raw)}")
    # a string that only looks like a data URL but is longer than any image counts as text
    fake = json.dumps({"prompt": "data:" + "x" * (2 * LIMITS.max_image_bytes)}).encode()
    assert data_url_bytes(fake, LIMITS) == 0
    assert _refusal(parse_body, fake, LIMITS, True).startswith("request bytes besides images")


def test_http_data_urls_are_not_counted_as_text():
    url = _data_url(IMAGE)
    content = [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": url}}]
    raw = json.dumps({"messages": [{"role": "user", "content": content}]}).encode()
    assert len(raw) > TEXT_CAP and data_url_bytes(raw, LIMITS) == len(url) + 1  # with its opening quote
    assert parse_body(raw, LIMITS, True)["messages"][0]["content"][1]["image_url"]["url"] == url
    assert _refusal(parse_body, raw, LIMITS, False).startswith("request bytes:")
    # at most max_images data URLs are left out of the size
    three = json.dumps({"messages": [{"role": "user", "content": content}] * 3}).encode()
    assert data_url_bytes(three, LIMITS) == 2 * (len(url) + 1)
