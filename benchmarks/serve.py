"""The server under load: 32 concurrent streaming clients against the same requests one after another;
a long image prompt admitted while 8 streams run; a non-streaming client that disconnects.

    python benchmarks/serve.py                               # small random model on CPU, 32 x 64 tokens
    python benchmarks/serve.py --shape 2b --dtype bfloat16 --device cuda --max-tokens 128
    python benchmarks/serve.py --scenario admission          # the longest token gap of 8 streams while a
                                                             # 3,000-token image prompt is admitted
    python benchmarks/serve.py --scenario disconnect         # tokens generated after a client went away
    python benchmarks/serve.py --source OTHER_CHECKOUT ...   # serve another checkout's code (before/after)

A random checkpoint (with a small byte-level BPE tokenizer trained on generated text) is written
once to --dir; ``qwen2vl serve`` runs it in a subprocess with --max-batch = --clients. Both phases
send the same greedy requests with ``ignore_eos`` (every answer is exactly --max-tokens long):
first one at a time, then all at once. Reported per phase: wall time, completion tokens/s, latency
p50/p99 (request sent -> ``[DONE]``) and time to first token p50/p99. The concurrent answers must
equal the sequential ones (greedy), so the check doubles as a correctness test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

SHAPES = {
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=2, mrope_section=[8, 12, 12], vision=dict(depth=2, embed_dim=128, num_heads=4)),
    "2b": None,  # the released 2B shape (preset), with the small tokenizer's special ids
}
WORDS = "red green blue circle square chart video frame count number reading text box left right".split()


def build(directory: Path, shape: str) -> None:
    from qwen2vl import Qwen2VL
    from qwen2vl.config import Qwen2VLConfig, TextConfig, VisionConfig, preset
    from qwen2vl.data.synthetic import vocabulary
    from qwen2vl.data.tokenizer_train import GENERIC_ENGLISH, SCAFFOLD, config_token_ids, train_tokenizer

    words = vocabulary.WORDS + vocabulary.FIRST_NAMES + vocabulary.LAST_NAMES + vocabulary.GROCERIES
    corpus = [" ".join(words[(i * 7 + k * 13) % len(words)] for k in range(12)) + f" {i}." for i in range(3000)]
    train_tokenizer(directory, corpus + SCAFFOLD * 20 + GENERIC_ENGLISH.splitlines() * 20, vocab_size=2048)
    ids = config_token_ids(directory)
    if shape == "2b":
        config = preset("qwen2-vl-2b")
    else:
        spec = dict(SHAPES[shape])
        vision = VisionConfig(**spec.pop("vision"), hidden_size=spec["hidden_size"])
        config = Qwen2VLConfig(text=TextConfig(rms_norm_eps=1e-6, vocab_size=ids["vocab_size"],
                                               max_position_embeddings=4096, **spec), vision=vision)
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                 "vision_token_id"):
        setattr(config, name, ids[name])
    config.text.bos_token_id, config.text.eos_token_id = ids["bos_token_id"], ids["eos_token_id"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Qwen2VL.from_config(config, dtype="bfloat16" if shape == "2b" else "float32", device=device, seed=0)
    model.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 200704}))


def requests(n: int, max_tokens: int) -> list[dict]:
    out = []
    for i in range(n):
        words = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(8 + (i * 5) % 40))
        out.append({"messages": [{"role": "user", "content": f"Request {i}: {words}"}], "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
    return out


async def one(client: httpx.AsyncClient, body: dict) -> dict:
    start = time.perf_counter()
    first, text, tokens, prompt_tokens, stamps = None, [], 0, 0, []
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens, prompt_tokens = chunk["usage"]["completion_tokens"], chunk["usage"]["prompt_tokens"]
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    stamps.append(time.perf_counter())
                    first = first or stamps[-1]
                    text.append(choice["delta"]["content"])
    end = time.perf_counter()
    return {"latency": end - start, "ttft": (first or end) - start, "tokens": tokens, "text": "".join(text),
            "start": start, "stamps": stamps, "prompt_tokens": prompt_tokens}


async def phase(url: str, bodies: list[dict], concurrent: bool) -> tuple[float, list[dict]]:
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        await one(client, {**bodies[0], "max_tokens": 2})  # warm up
        start = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(one(client, b) for b in bodies))
        else:
            results = [await one(client, b) for b in bodies]
        return time.perf_counter() - start, list(results)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def summary(wall: float, results: list[dict]) -> dict:
    latency, ttft = [r["latency"] for r in results], [r["ttft"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"wall_s": round(wall, 3), "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "latency_p50_s": round(statistics.median(latency), 3), "latency_p99_s": round(percentile(latency, 99), 3),
            "ttft_p50_s": round(statistics.median(ttft), 3), "ttft_p99_s": round(percentile(ttft, 99), 3)}


def wait_healthy(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not come up")


def long_prompt(words: int) -> dict:
    """A streaming request of one generated picture and ``words`` words."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (448, 448, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    text = " ".join(WORDS[k % len(WORDS)] for k in range(words))
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": text}]}],
            "max_tokens": 4, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}


async def admission(url: str, streams: int, max_tokens: int, prompt_words: int) -> dict:
    """The longest gap between tokens of ``streams`` running streams while a long prompt is admitted."""
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        await one(client, {**requests(1, 2)[0]})  # warm up
        chunk = await one(client, {**long_prompt(210), "max_tokens": 1})  # ~512 tokens (one chunk), alone
        running = [asyncio.create_task(one(client, b)) for b in requests(streams, max_tokens)]
        await asyncio.sleep(1.0)
        big = await one(client, long_prompt(prompt_words))
        results = await asyncio.gather(*running)
    window = (big["start"], big["start"] + big["ttft"])
    gaps = []
    for r in results:
        stamps = r["stamps"]
        gaps += [b - a for a, b in zip(stamps, stamps[1:]) if b >= window[0] and a <= window[1]]
    if not gaps:
        raise SystemExit("the streams ended before the long prompt was admitted: raise --max-tokens")
    longest = max(gaps)
    return {"streams": streams, "long_prompt_tokens": big["prompt_tokens"],
            "long_prompt_ttft_s": round(big["ttft"], 3),
            "one_chunk_tokens": chunk["prompt_tokens"], "one_chunk_ttft_s": round(chunk["ttft"], 3), "longest_gap_s": round(longest, 3),
            "gap_over_chunk": round(longest / chunk["ttft"], 2),
            "stream_tokens_during_admission": sum(sum(window[0] <= t <= window[1] for t in r["stamps"])
                                                  for r in results)}


async def disconnect(url: str, max_tokens: int, after_s: float) -> dict:
    """A non-streaming request whose client goes away after ``after_s``: tokens generated afterwards."""
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        before = (await client.get("/health")).json()["generated_tokens"]
        body = {**requests(1, max_tokens)[0], "stream": False}
        try:
            await asyncio.wait_for(client.post("/v1/chat/completions", json=body), after_s)
        except asyncio.TimeoutError:
            pass
        gone = (await client.get("/health")).json()
        await asyncio.sleep(2.0)
        later = (await client.get("/health")).json()
    return {"tokens_before_disconnect": gone["generated_tokens"] - before,
            "tokens_after_disconnect": later["generated_tokens"] - gone["generated_tokens"],
            "cancelled": later["cancelled"] - gone["cancelled"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="serve this checkpoint instead of building a random one")
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "qwen2vl-serve-bench"))
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--dtype")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, help="torch CPU threads of the server (OMP_NUM_THREADS)")
    p.add_argument("--scenario", choices=("load", "admission", "disconnect"), default="load")
    p.add_argument("--prompt-words", type=int, default=2300,
                   help="admission: words of the long prompt (with its image, ~3,000 tokens)")
    p.add_argument("--source", help="run the server from this checkout of the project (before/after runs)")
    args = p.parse_args()

    model = Path(args.model) if args.model else Path(args.dir) / args.shape
    if not args.model and not (model / "config.json").is_file():
        model.mkdir(parents=True, exist_ok=True)
        build(model, args.shape)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    if args.source:
        env["PYTHONPATH"] = str(Path(args.source).resolve())
    command = [sys.executable, "-m", "qwen2vl", "serve", "--model", str(model), "--port", str(port),
               "--max-batch", str(args.clients), "--max-queue", str(2 * args.clients), "--device", args.device]
    if args.dtype:
        command += ["--dtype", args.dtype]
    server = subprocess.Popen(command, env=env, cwd=args.source)  # `-m` imports from the working directory first
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server)
        if args.scenario != "load":
            if args.scenario == "admission":
                report = asyncio.run(admission(url, 8, args.max_tokens, args.prompt_words))
            else:
                report = asyncio.run(disconnect(url, args.max_tokens, 1.0))
            print(json.dumps({"scenario": args.scenario, "source": args.source or "this checkout", **report},
                             indent=2))
            return
        bodies = requests(args.clients, args.max_tokens)
        sequential = asyncio.run(phase(url, bodies, concurrent=False))
        concurrent = asyncio.run(phase(url, bodies, concurrent=True))
        health = httpx.get(f"{url}/health").json()
    finally:
        server.terminate()
        server.wait(60)
    same = [a["text"] for a in sequential[1]] == [b["text"] for b in concurrent[1]]
    report = {"model": str(model), "shape": args.shape, "device": args.device, "clients": args.clients,
              "max_tokens": args.max_tokens, "sequential": summary(*sequential),
              "concurrent": summary(*concurrent), "answers_equal": same, "peak_batch": health["peak_batch"]}
    report["throughput_ratio"] = round(report["concurrent"]["tokens_per_s"] / report["sequential"]["tokens_per_s"], 2)
    print(json.dumps(report, indent=2))
    if not same:
        raise SystemExit("concurrent answers differ from the sequential ones")


if __name__ == "__main__":
    main()
