"""TTFT of image requests through the real cluster: encode pool (EPD) vs. encoding in the prefill worker.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.encode [--images 1 2 4 8] [--modes inproc disagg-1 disagg-2]
                                                        [--repeats 1] [--vision-layers 24]

Model: a LLaVA checkpoint written once to $TRIPTYCH_CACHE_DIR/bench/ (~1.2 GB): vision tower with
CLIP ViT-L/14-336 shapes (hidden 1024, 24 layers, 16 heads, patch 14, 336 px → 576 image tokens
after LLaVA-1.5's feature layer -2 / CLS drop), seeded random fp32 weights, the LLaVA projector,
and a tiny seeded 2-layer Llama text side (hidden 64) with the SmolLM2 tokenizer.

Each mode is a real deployment started by the controller on a fresh local Ray, requests go
through the router (`router.generate`) exactly as from the gateway:

  inproc    no encode pool: the router sends the image bytes to the prefill worker actor, which
            decodes, preprocesses and runs the ViT itself, then prefills (prefill: 2 CPUs/threads)
  disagg-1  one encode worker actor (2 CPUs/threads) encodes; features go over shm to the
            prefill worker actor (1 CPU), which prefills
  disagg-2  two encode worker actors (1 CPU/thread each) encode the images split by plan_shards

One request at a time, fresh images every request (no cache hits), prompt = 16 text tokens + one
image token per image, max_tokens = 1. TTFT is the router's: from the request entering the router
to its first token (admission with image decoding, encode, prefill, KV transfer, activation).
Encode: EPD — the router's encode fan-out (preprocess + ViT + feature send); inproc — the prefill
worker's preprocess + ViT. Prefill: the prefill worker's forward.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
from pathlib import Path

import torch

from bench.common import print_table

IMAGE_TOKEN_ID = 49151  # the SmolLM2 tokenizer's last token, marked special, stands in for <image>
TEXT_TOKENS = 16
MODES = {  # mode → (encode workers, encode num_cpus, prefill num_cpus)
    "inproc": (0, 1, 2),
    "disagg-1": (1, 2, 1),
    "disagg-2": (2, 1, 1),
}


def checkpoint(vision_layers: int) -> Path:
    """The bench's LLaVA checkpoint (built and saved once, then reused)."""
    from transformers import AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from engine import envs, model_loader

    path = envs.cache_dir() / "bench" / f"llava-vit-l14-336-{vision_layers}l-tiny-llama"
    if (path / "config.json").exists():
        return path
    print(f"building the bench checkpoint in {path} ...", flush=True)
    tok = AutoTokenizer.from_pretrained(model_loader.local_dir(model_loader.resolve(None)))
    tok.add_special_tokens({"additional_special_tokens": [tok.convert_ids_to_tokens(IMAGE_TOKEN_ID)]})
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=vision_layers,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(path)
    return path


def images_for(n: int, seed: int) -> list[bytes]:
    """n different 640x480 JPEGs (seeded noise: nothing repeats, no cache hit)."""
    from PIL import Image

    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed * 100 + i)
        arr = torch.randint(0, 256, (480, 640, 3), generator=g, dtype=torch.uint8).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def deploy_config(model_dir: Path, mode: str, max_images: int):
    from cluster.config import parse_config

    enc_workers, enc_cpus, prefill_cpus = MODES[mode]
    max_len = TEXT_TOKENS + max_images * 576 + 64
    block = 16
    return parse_config(
        {
            "version": 1,
            "model": {"path": str(model_dir), "max_model_len": max_len},
            "ray": {"num_cpus": 4},
            "engine": {
                "block_size": block,
                "num_kv_blocks": -(-max_len // block) + 8,
                "max_num_batched_tokens": max_len,
                "max_num_seqs": 2,
            },
            "pools": {
                "encode": {"workers": enc_workers, "num_cpus": enc_cpus},
                "prefill": {"workers": 1, "num_cpus": prefill_cpus},
                "decode": {"workers": 1, "num_cpus": 1},
            },
            "server": {"request_timeout_s": 3600},
        },
        f"bench-encode-{mode}",
    )


async def run_mode(model_dir: Path, mode: str, counts: list[int], repeats: int, seed0: int) -> list[dict]:
    from cluster.controller import start_router
    from cluster.router_api import FinalEvent, GenerateInput
    from engine.sequence import SamplingParams

    router = await start_router(deploy_config(model_dir, mode, max(counts)), progress=lambda m: None)
    rows = []
    try:
        seed = seed0

        async def one(n: int) -> FinalEvent:
            nonlocal seed
            seed += 1
            prompt = tuple(range(100, 100 + TEXT_TOKENS)) + (IMAGE_TOKEN_ID,) * n
            req = GenerateInput(
                f"{mode}-{n}-{seed}", SamplingParams(max_tokens=1), token_ids=prompt, images=tuple(images_for(n, seed))
            )
            final = None
            async for ev in router.generate(req):
                if isinstance(ev, FinalEvent):
                    final = ev
            if final is None or final.error:
                raise RuntimeError(f"{mode}, {n} images: {final.error if final else 'no final event'}")
            return final

        await one(1)  # warm-up: first forward of each actor
        for n in counts:
            finals = [await one(n) for _ in range(repeats)]
            t = [f.timings for f in finals]
            row = {
                "mode": mode,
                "images": n,
                "prompt_tokens": finals[0].prompt_tokens,
                "encode_s": statistics.median(x.encode_s for x in t),
                "prefill_s": statistics.median(x.prefill_s for x in t),
                "ttft_s": statistics.median(x.ttft_s for x in t),
                "ttft_all": [x.ttft_s for x in t],
                "load": os.getloadavg()[0],
            }
            rows.append(row)
            print(
                f"  {mode:8s} {n} images: TTFT {row['ttft_s']:.2f}s (encode {row['encode_s']:.2f}s, "
                f"prefill {row['prefill_s']:.2f}s; every TTFT {[round(x, 2) for x in row['ttft_all']]}) "
                f"load {row['load']:.1f}",
                flush=True,
            )
    finally:
        await router.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--repeats", type=int, default=1, help="requests per image count (median reported)")
    ap.add_argument("--vision-layers", type=int, default=24)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    model_dir = checkpoint(args.vision_layers)
    load0 = os.getloadavg()[0]
    rows = []
    for k, mode in enumerate(args.modes):
        print(f"{mode}: starting the deployment ...", flush=True)
        rows += asyncio.run(run_mode(model_dir, mode, args.images, args.repeats, seed0=1000 * (k + 1)))

    print(
        f"\nvision: ViT-L/14-336 shapes, {args.vision_layers} layers, fp32, seeded random; text: 2-layer "
        f"Llama (hidden 64); CPU, {os.cpu_count()} cores; load average {load0:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end; median of {args.repeats} request(s) per row"
    )
    labels = {
        "inproc": "in prefill worker (2 threads)",
        "disagg-1": "EPD, 1 encode worker (2 threads)",
        "disagg-2": "EPD, 2 encode workers (1 thread each)",
    }
    print_table(
        ["encoding", "images", "prompt tokens", "encode s", "prefill s", "TTFT s"],
        [
            [
                labels[r["mode"]],
                str(r["images"]),
                str(r["prompt_tokens"]),
                f"{r['encode_s']:.2f}",
                f"{r['prefill_s']:.2f}",
                f"{r['ttft_s']:.2f}",
            ]
            for r in rows
        ],
    )


if __name__ == "__main__":
    main()
