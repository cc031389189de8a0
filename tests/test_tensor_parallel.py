"""Tensor parallelism on CPU (gloo, 2 processes): the same logits and tokens as one process, the rules.

The 2-process checks run in one ``torch.multiprocessing`` spawn (starting processes is the cost);
a failed assertion in a rank fails the test with that rank's traceback.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from engine_helpers import write_image, write_video
from processing_helpers import build_model_dir
from train_helpers import tiny_model_config

from qwen2vl.config import Qwen2VLConfig, TextConfig, VisionConfig, preset
from qwen2vl.distributed import TensorParallelLayout
from qwen2vl.model import Qwen2VL

REPO = Path(__file__).resolve().parents[1]
LOGIT_TOL = 1e-5  # of the logit scale: float32 rounding of the row-parallel sums, nothing else
SPAWN_TIMEOUT_S = 240


def build_tp_checkpoint(directory: Path, **text) -> Path:
    """A tiny random checkpoint (our own writer) with a processor; a large init std separates the logits."""
    build_model_dir(str(directory), preprocessor={"min_pixels": 3136, "max_pixels": 56 * 56 * 4,
                                                  "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2})
    config = Qwen2VLConfig.from_dict(tiny_model_config(directory, initializer_range=0.1, **text))
    Qwen2VL.from_config(config, seed=1).save_pretrained(directory)
    return directory


def user(*parts: str) -> list[dict]:
    content = [{"type": "image", "image": p} if p.endswith(".png") else
               {"type": "video", "video": p, "nframes": 4} if p.endswith(".mp4") else
               {"type": "text", "text": p} for p in parts]
    return [{"role": "user", "content": content}]


def spawn(fn, *args) -> None:
    """Run ``fn(rank, init_method, *args)`` on 2 gloo ranks."""
    with tempfile.TemporaryDirectory() as rendezvous:
        context = mp.start_processes(fn, args=("file://" + os.path.join(rendezvous, "store"), *args), nprocs=2,
                                     join=False, start_method="spawn")
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        try:
            while not context.join(timeout=5):  # False while a rank runs; raises with a failed rank's traceback
                if time.monotonic() > deadline:
                    raise TimeoutError(f"tensor-parallel ranks still running after {SPAWN_TIMEOUT_S} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()


def join_group(rank: int, init_method: str) -> None:
    torch.set_num_threads(1)
    os.environ["WORLD_SIZE"] = "2"
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)


def parity_worker(rank: int, init_method: str, root: str) -> None:
    from qwen2vl.distributed import close, init_tensor_parallel, load_tensor_parallel, shared_seed
    from qwen2vl.generation.engine import Engine, read_generation_config
    from qwen2vl.processing import Processor

    join_group(rank, init_method)
    mesh, _ = init_tensor_parallel(2, "cpu")
    root = Path(root)
    image, video = str(root / "a.png"), str(root / "clip.mp4")
    prompts = [user(image, "What is this?"), user(video, "What happens?"), user("Tell me a story."),
               user(image, video, "Both?")]
    for name, fuse in (("model", False), ("model", True), ("model_kv1", False)):
        directory = root / name
        single = Qwen2VL.from_pretrained(directory)
        sharded = load_tensor_parallel(directory, mesh, fuse=fuse)
        processor = Processor.from_pretrained(directory)
        for conversation in prompts:
            batch = processor([conversation], add_generation_prompt=True)
            if "pixel_values" in batch:
                features = [m.encode_vision(batch["pixel_values"], batch["image_grid_thw"]) for m in (single, sharded)]
                assert (features[1] - features[0]).abs().max() <= LOGIT_TOL * features[0].abs().max()
            with torch.no_grad():
                want, got = single(**batch), sharded(**batch)
            scale = want.abs().max()
            assert (got - want).abs().max() <= LOGIT_TOL * scale, (name, fuse, conversation)
        generation = read_generation_config(directory)
        one, tp = Engine(single, processor, generation), Engine(sharded, processor, generation)
        want = [r.token_ids for r in one.generate(prompts, max_new_tokens=16)]
        got = [r.token_ids for r in tp.generate(prompts, max_new_tokens=16)]
        assert got == want and all(len(t) == 16 for t in want), (name, fuse, got, want)
        sampled = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=5)
        assert tp.generate(prompts[2], **sampled)[0].token_ids == one.generate(prompts[2], **sampled)[0].token_ids
    seed = shared_seed(None)  # drawn on rank 0: every rank samples the same unseeded answer
    sampled = tp.generate(prompts[0], max_new_tokens=16, temperature=1.0, seed=seed)[0].token_ids
    seen = [None, None]
    dist.all_gather_object(seen, (seed, sampled))
    assert seen[0] == seen[1]
    assert sharded.lm_head.weight is sharded.model.embed_tokens.weight
    cache_heads = sharded.config.text.num_key_value_heads
    assert cache_heads == 1 and sharded.config.text.head_dim == single.config.text.head_dim
    close()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    build_tp_checkpoint(root / "model")
    # 1 KV head, copied to both ranks; lm_head tied to the embedding (as in the 2B)
    build_tp_checkpoint(root / "model_kv1", num_key_value_heads=1, tie_word_embeddings=True)
    (root / "model" / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    write_image(root / "a.png", (90, 70), seed=1)
    write_video(root / "clip.mp4")
    return root


def test_two_ranks_match_one_process(root):
    """Image, video, text and image+video prompts: logits within float32 rounding; 16 greedy tokens and
    16 seeded sampled tokens identical; plain, fused projections, and a KV head replicated on both
    ranks with a tied lm_head; the ViT sharded too (its features within rounding); an unseeded sample is the same on
    both ranks (the seed comes from rank 0)."""
    spawn(parity_worker, str(root))


# --------------------------------------------------------------------------- memory while loading
def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_worker(rank: int, init_method: str, directory: str, out: str, world: int) -> None:
    """Peak RSS growth (kB) from before loading until every weight has been read once (as a forward
    reads them): the whole model in one process, or this rank's shard. Loading on the CPU maps the
    file and reads nothing, so the reading is what brings the weights into memory."""
    from qwen2vl.distributed import close, init_tensor_parallel, load_tensor_parallel
    torch.set_num_threads(1)
    if world > 1:
        join_group(rank, init_method)
        mesh, _ = init_tensor_parallel(world, "cpu")
    importlib.import_module("torch._dynamo")  # parallelize_module imports it: ~30 MB of code, not weights
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from the current RSS
    before = status_kb("VmRSS")
    model = load_tensor_parallel(directory, mesh) if world > 1 else Qwen2VL.from_pretrained(directory)
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    checksum = sum(float(p.detach().double().sum()) for p in local)
    grown = status_kb("VmHWM") - before
    held = sum(p.nbytes for p in local)
    Path(out, f"{world}-{rank}.json").write_text(json.dumps({"grown_kb": grown, "held_bytes": held,
                                                             "checksum": checksum}))
    if world > 1:
        close()


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmRSS from /proc")
def test_loading_a_shard_takes_about_half_the_memory(tmp_path, capsys):
    """A 60M-parameter float32 model (246 MB in 16 files): the peak RSS of each of 2 ranks grows by
    about half of one process's (fresh processes, from before loading until every weight was read;
    measured here: 255 MB one process, 134 and 130 MB per rank)."""
    directory = tmp_path / "model"
    build_model_dir(str(directory), preprocessor={"min_pixels": 3136, "max_pixels": 56 * 56 * 4})
    config = Qwen2VLConfig.from_dict(tiny_model_config(directory, hidden_size=512, intermediate_size=2048,
                                                       num_hidden_layers=16, num_attention_heads=8,
                                                       num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]}))
    Qwen2VL.from_config(config).save_pretrained(directory, max_shard_size="16MB")  # 16 files, like 5 GB of a 72B's
    weights = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    out = tmp_path / "rss"
    out.mkdir()
    with tempfile.TemporaryDirectory() as rendezvous:
        mp.start_processes(memory_worker, args=("", str(directory), str(out), 1), nprocs=1, start_method="spawn")
        mp.start_processes(memory_worker, args=("file://" + os.path.join(rendezvous, "store"), str(directory),
                                                str(out), 2), nprocs=2, start_method="spawn")
    single = json.loads((out / "1-0.json").read_text())
    ranks = [json.loads((out / f"2-{r}.json").read_text()) for r in range(2)]
    with capsys.disabled():
        print(f"\n  peak RSS growth while loading {weights / 1e6:.0f} MB of weights: one process "
              f"{single['grown_kb'] / 1e3:.0f} MB; TP=2 ranks {[round(r['grown_kb'] / 1e3) for r in ranks]} MB")
    for r in ranks:
        assert r["held_bytes"] < 0.55 * single["held_bytes"]
        assert r["grown_kb"] < 0.6 * single["grown_kb"]
    assert single["grown_kb"] * 1024 > 0.9 * weights  # the single figure is a real load, not noise


# --------------------------------------------------------------------------- the command line
def test_torchrun_generate_prints_one_json_like_one_process(root, capsys):
    """``torchrun --nproc-per-node 2 -m qwen2vl generate --tensor-parallel 2 --json``: rank 0 alone
    prints, one JSON object with the fields and tokens of one process."""
    from qwen2vl.cli import main

    args = ["generate", "--model", str(root / "model"), "--image", str(root / "a.png"), "--prompt", "What is this?",
            "--max-new-tokens", "16", "--json", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TORCH_DISTRIBUTED_DEBUG="DETAIL")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "qwen2vl", *args, "--tensor-parallel", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: a hang is cleaned up whole
    try:
        stdout, stderr = proc.communicate(timeout=SPAWN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, stdout
    sharded = json.loads(lines[0])
    assert main(args) == 0
    single = json.loads(capsys.readouterr().out)
    assert sharded.keys() == single.keys() and sharded["timings"].keys() == single["timings"].keys()
    for key in ("text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens"):
        assert sharded[key] == single[key], key
    assert single["completion_tokens"] == 16


def test_torchrun_serve_answers_the_openai_client_like_one_process(root):
    """``torchrun --nproc-per-node 2 -m qwen2vl serve --tensor-parallel 2``: rank 0 serves, rank 1 follows;
    greedy and seeded answers (text, image, two at once) equal those of one process's engine."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import openai

    from qwen2vl.generation.engine import Engine

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "qwen2vl",
           "serve", "--model", str(root / "model"), "--device", "cpu", "--port", str(port), "--tensor-parallel", "2",
           "--allowed-media-dir", str(root), "--max-batch", "4"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        while True:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the tensor-parallel server did not come up"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        asks = [(user("Describe a day."), {}), (user(str(root / "a.png"), "What is it?"), {}),
                (user("Tell a story."), {"temperature": 1.0, "seed": 3})]

        def ask(item):
            conversation, options = item
            return client.chat.completions.create(model="model", messages=conversation, max_tokens=12,
                                                  **options).choices[0].message.content
        with ThreadPoolExecutor(3) as pool:  # together: the follower steps several rows at once too
            answers = list(pool.map(ask, asks))
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # uvicorn stops on rank 0, which then stops rank 1
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    engine = Engine.from_pretrained(root / "model")
    for (conversation, options), answer in zip(asks, answers):
        assert answer == engine.generate([conversation], max_new_tokens=12, skip_special_tokens=True,
                                         **options)[0].text


def test_tensor_parallel_without_torchrun_or_in_other_verbs_is_refused(root, capsys):
    from qwen2vl.cli import main

    model = ["--model", str(root / "model"), "--tensor-parallel", "2"]
    assert main(["generate", *model, "--prompt", "Hi"]) == 2
    assert "--tensor-parallel 2 needs 2 processes started by torchrun" in capsys.readouterr().err
    assert main(["chat", *model]) == 2
    assert "only qwen2vl generate and serve run tensor-parallel so far" in capsys.readouterr().err


# --------------------------------------------------------------------------- the rules, no processes needed
def text_config(heads: int, kv: int, hidden: int | None = None, vision_heads: int = 16, **kw) -> Qwen2VLConfig:
    """The released vision tower (16 heads, 5120 MLP columns) under a small decoder."""
    text = TextConfig(hidden_size=hidden or 16 * heads, num_attention_heads=heads, num_key_value_heads=kv,
                      intermediate_size=kw.pop("intermediate_size", 64), vocab_size=kw.pop("vocab_size", 128), **kw)
    return Qwen2VLConfig(text=text, vision=VisionConfig(num_heads=vision_heads, embed_dim=80 * vision_heads))


@pytest.mark.parametrize("name,worlds", [("qwen2-vl-2b", (1, 2, 4)), ("qwen2-vl-7b", (1, 2, 4)),
                                         ("qwen2-vl-72b", (1, 2, 4, 8))])
def test_released_models_shard_on(name, worlds):
    config = preset(name)
    for world in (1, 2, 3, 4, 8):
        if world in worlds:
            layouts = [TensorParallelLayout.for_config(config, r, world) for r in range(world)]
            assert sum(layout.local_heads for layout in layouts) == config.text.num_attention_heads
        else:
            with pytest.raises(ValueError, match="cannot shard"):
                TensorParallelLayout.for_config(config, 0, world)


def test_heads_and_kv_heads_per_rank():
    # 8 query heads, 2 KV heads on 4 ranks: each KV head on 2 ranks, next to the query heads using it
    layouts = [TensorParallelLayout.for_config(text_config(8, 2), r, 4) for r in range(4)]
    d = layouts[0].head_dim
    assert [lay.split("model.layers.0.self_attn.q_proj.weight") for lay in layouts] == \
        [(0, 2 * r * d, 2 * (r + 1) * d) for r in range(4)]
    assert [lay.split("model.layers.3.self_attn.k_proj.bias") for lay in layouts] == \
        [(0, 0, d), (0, 0, d), (0, d, 2 * d), (0, d, 2 * d)]
    assert layouts[1].split("model.layers.0.self_attn.o_proj.weight") == (1, 2 * d, 4 * d)
    assert layouts[3].split("model.layers.0.mlp.down_proj.weight") == (1, 48, 64)
    assert layouts[3].split("lm_head.weight") == (0, 96, 128)
    assert layouts[0].split("model.norm.weight") is None and layouts[0].split("visual.merger.mlp.0.weight") is None
    # the ViT's 16 heads of 80: rank 1 of 4 holds heads 4-7 of each of q, k and v, and fc1 rows 1280-2560
    assert layouts[1].split("visual.blocks.5.attn.qkv.weight") == (0, 320, 640)
    assert layouts[1].shape("visual.blocks.5.attn.qkv.bias", (3840,)) == (960,)
    assert layouts[1].split("visual.blocks.5.attn.proj.weight") == (1, 320, 640)
    assert layouts[1].split("visual.blocks.5.mlp.fc1.bias") == (0, 1280, 2560)
    assert layouts[1].split("visual.blocks.5.mlp.fc2.weight") == (1, 1280, 2560)
    # 8 KV heads on 4 ranks: split
    assert TensorParallelLayout.for_config(text_config(8, 8), 1, 4).split("model.layers.0.self_attn.v_proj.weight") \
        == (0, 2 * d, 4 * d)


@pytest.mark.parametrize("config,world,message", [
    (text_config(4, 2), 8, "tensor-parallel size 8 is larger than the 4 attention heads"),
    (text_config(6, 6), 4, "6 attention heads do not divide among 4 ranks"),
    (text_config(12, 6, hidden=192), 4, r"6 KV heads can neither be split among 4 ranks \(6 % 4 != 0\)"),
    (text_config(4, 4, intermediate_size=66), 4, "intermediate_size 66 is not divisible"),
    (text_config(4, 4, vocab_size=130), 4, "vocab_size 130 is not divisible by the tensor-parallel size 4"),
    (text_config(4, 4, vision_heads=6), 4, "vision num_heads 6 is not divisible"),
])
def test_refused_shapes_name_the_numbers(config, world, message):
    with pytest.raises(ValueError, match=message):
        TensorParallelLayout.for_config(config, 0, world)


def test_world_size_must_match_the_processes(monkeypatch):
    from qwen2vl.distributed import init_tensor_parallel
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="--tensor-parallel 2 needs 2 processes started by torchrun"):
        init_tensor_parallel(2, "cpu")
