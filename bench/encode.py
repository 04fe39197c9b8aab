"""TTFT of image requests: encode inside the prefill process vs. on separate encode workers (EPD).

    .venv/bin/python -m bench.encode [--images 1 2 4 8] [--text smol|tiny] [--vision-layers 24]

Vision side: CLIP ViT-L/14-336 shapes (hidden 1024, 24 layers, 16 heads, patch 14, 336 px →
576 image tokens after LLaVA-1.5's feature layer -2 / CLS drop), seeded random weights, fp32,
plus the LLaVA projector into the text hidden size. Text side: `smol` = the real SmolLM2-135M
weights (hidden 576, 30 layers) used as the language model, or `tiny` = a seeded 2-layer Llama.
Prompt: 16 text tokens + one image token per image (expanded to 576 each), max_tokens=1.

Measured per request (fresh images each time, so no cache hits), one request at a time:
  inproc    decode+preprocess, one batched ViT forward, merge, engine prefill, all in this process
  disagg-1  one EncodeWorker actor (torch threads = all) encodes; features cross shm into this
            process (the prefill side); then the same engine prefill
  disagg-2  two EncodeWorker actors (1 thread each) encode the images split by plan_shards
TTFT = from the request's image bytes in hand to the first token sampled. The lead's prefill
worker is not used: the prefill here is LLMEngine.step() in the driver, which is what it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import time

import ray
import torch

from bench.common import print_table
from encode_workers.encoder import ImageEncoder
from encode_workers.parallel import encode_parallel, plan_shards
from encode_workers.transfer import prepare_image_receive, receive_image_features
from encode_workers.worker import EncodeWorkerActor
from engine import multimodal
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine, LoadedModel
from engine.sequence import SamplingParams
from kv_transfer.layout import KVLayout
from kv_transfer.registry import get_backend

IMAGE_TOKEN_ID = 49151  # a plain SmolLM2 vocabulary token stands in for <image>


def llava_config(text_hidden: int, vision_layers: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                              hidden_act="quick_gelu")
    return LlavaConfig(vision_config=vision, text_config=LlamaConfig(hidden_size=text_hidden),
                       image_token_index=IMAGE_TOKEN_ID)


def vit_l_encoder(text_hidden: int, vision_layers: int) -> ImageEncoder:
    """Seeded: every process that calls this builds bit-identical weights."""
    config = llava_config(text_hidden, vision_layers)
    torch.manual_seed(0)
    vision = multimodal.VisionEncoder(config).eval()
    return ImageEncoder(vision, multimodal.ImageProcessor.from_config(config), "bench-vit-l")


def text_side(kind: str) -> LoadedModel:
    smol = LoadedModel.load(None)
    if kind == "smol":
        return LoadedModel(smol.model, smol.tokenizer, smol.name, image_token_id=IMAGE_TOKEN_ID)
    from tests.conftest import build_tiny_llama

    tiny = build_tiny_llama(len(smol.tokenizer))
    tiny.config.max_position_embeddings = 8192  # default RoPE: any position works; 8 images need 4.6K
    return LoadedModel(tiny, smol.tokenizer, "tiny", image_token_id=IMAGE_TOKEN_ID)


def images_for(n: int, seed: int) -> list[bytes]:
    from PIL import Image

    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed * 100 + i)
        arr = torch.randint(0, 256, (480, 640, 3), generator=g, dtype=torch.uint8).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def first_token(engine: LLMEngine, prompt: list[int], feats: list[torch.Tensor]) -> None:
    engine.add_request(prompt, SamplingParams(max_tokens=1), image_features=feats)
    while engine.has_unfinished():
        engine.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--text", choices=["smol", "tiny"], default="smol")
    ap.add_argument("--vision-layers", type=int, default=24)
    ap.add_argument("--modes", nargs="+", default=["inproc", "disagg-1", "disagg-2"])
    args = ap.parse_args()

    threads = torch.get_num_threads()
    loaded = text_side(args.text)
    hidden = loaded.model.config.hidden_size
    engine = LLMEngine(EngineConfig(block_size=16, num_kv_blocks=640, max_num_batched_tokens=8192, max_num_seqs=4),
                       loaded)
    local = vit_l_encoder(hidden, args.vision_layers)
    spec = multimodal.ImageFeatureSpec(local.num_image_tokens, hidden, torch.float32)
    ks = engine.kv_spec
    rx = get_backend("shm").Receiver(KVLayout("bench", ks.dtype, ks.num_layers, ks.num_kv_heads, ks.head_dim, ks.block_size))

    ray.init(address="local", num_cpus=max(2, threads), include_dashboard=False, log_to_driver=False)
    pools = {}
    if "disagg-1" in args.modes:
        pools["disagg-1"] = [EncodeWorkerActor.options(num_cpus=0).remote(
            encoder_factory=lambda: vit_l_encoder(hidden, args.vision_layers), cache_bytes=0, torch_threads=threads)]
    if "disagg-2" in args.modes:
        pools["disagg-2"] = [EncodeWorkerActor.options(num_cpus=0).remote(
            encoder_factory=lambda: vit_l_encoder(hidden, args.vision_layers), cache_bytes=0,
            torch_threads=max(1, threads // 2)) for _ in range(2)]
    for workers in pools.values():
        ray.get([w.stats.remote() for w in workers])  # wait until built

    def run(mode: str, n: int, seed: int) -> dict[str, float]:
        images = images_for(n, seed)
        prompt = list(range(100, 116)) + [IMAGE_TOKEN_ID] * n
        t0 = time.perf_counter()
        if mode == "inproc":
            pixels = torch.stack([local.preprocess(b, i) for i, b in enumerate(images)])
            feats = local.forward(pixels)
        else:
            workers = pools[mode]
            plan = plan_shards(f"r{seed}", images, len(workers))
            shards = [s for _, s in plan]
            descs = prepare_image_receive(rx, shards, spec)
            asyncio.run(encode_parallel(workers, plan, images, descs, timeout=600))
            feats = receive_image_features(rx, shards, timeout=600)
        t1 = time.perf_counter()
        first_token(engine, prompt, feats)
        t2 = time.perf_counter()
        return {"encode_s": t1 - t0, "prefill_s": t2 - t1, "ttft_s": t2 - t0}

    rows, seed = [], 0
    for mode in args.modes:
        run(mode, 1, seed := seed + 1)  # warm-up
        for n in args.images:
            r = run(mode, n, seed := seed + 1)
            rows.append([mode, str(n), str(n * spec.num_tokens + 16), f"{r['encode_s']:.2f}", f"{r['prefill_s']:.2f}",
                         f"{r['ttft_s']:.2f}"])
            print(rows[-1], flush=True)
    print(f"\nvision: ViT-L/14-336 shapes, {args.vision_layers} layers, fp32, random seeded; text: {args.text} "
          f"(hidden {hidden}); torch threads {threads}; CPU")
    print_table(["mode", "images", "prompt tokens", "encode(+transfer) s", "prefill s", "TTFT s"], rows)
    rx.close()
    ray.shutdown()


if __name__ == "__main__":
    main()
