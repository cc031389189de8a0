"""Preprocessing speed: qwen2vl.processing against qwen-vl-utils 0.0.14 + transformers 4.57.1's processor.

Two prompts, both at the hub's preprocessor bounds (min_pixels 3136, max_pixels 12845056):
a 1920x1080 JPEG (-> 1092x1932, 2691 tokens) and a 720p H.264 video (qwen-vl-utils' 2 fps rule).
The inputs are generated here with PIL and PyAV. The reference is what Qwen's model card does:
``process_vision_info`` (qwen-vl-utils) then ``Qwen2VLProcessor`` (slow PIL image processor; the
video processor needs torchvision, which does not import beside this torch, so videos go through
the slow image processor's video path, the same arithmetic). qwen-vl-utils imports torchvision at
load time: a stand-in supplies ``read_video`` (decode every frame with PyAV, as torchvision does)
and ``resize`` (torch's antialiased bicubic, as torchvision does); with decord installed the
reference is also timed with decord, qwen-vl-utils' preferred reader. Both sides must produce
equal grids and pixel values before any time is reported.

    python benchmarks/preprocess.py [--seconds 30] [--fps 25] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from processing_helpers import build_model_dir, qwen_vl_utils  # noqa: E402

from qwen2vl.processing import Processor  # noqa: E402

HUB = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}


def make_image(path: str) -> str:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:1080, 0:1920]
    img = np.dstack([x * 255 // 1919, y * 255 // 1079, (x // 7 + y // 5) % 256]).astype(np.uint8)
    img = np.clip(img.astype(np.int16) + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, quality=90)
    return path


def make_video(path: str, seconds: int, fps: int) -> str:
    import av

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 40, (720, 1280 + 8 * seconds * fps, 3), dtype=np.uint8)
    y, x = np.mgrid[0:720, 0:1280]
    base = np.dstack([x * 255 // 1279, y * 255 // 719, np.zeros_like(x)]).astype(np.uint8)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "veryfast", "crf": "23"})
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        for i in range(seconds * fps):
            frame = base + noise[:, 8 * i: 8 * i + 1280]  # a textured pan
            frame[..., 2] = (i * 255) // (seconds * fps)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def reference_pipeline(model_dir: str):
    """qwen-vl-utils process_vision_info + transformers Qwen2VLProcessor (slow PIL image processor)."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

    vp = qwen_vl_utils()
    image_processor = Qwen2VLImageProcessor(min_pixels=HUB["min_pixels"], max_pixels=HUB["max_pixels"])

    class VideoProcessor:
        merge_size = 2

        def __call__(self, videos, **_):
            return image_processor(images=None, videos=videos)

    class OracleProcessor(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            return type(arg) if name == "video_processor" else super().check_argument_for_proper_class(name, arg)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    processor = OracleProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=VideoProcessor())

    def run(conversation, reader: str):
        vp.FORCE_QWENVL_VIDEO_READER = reader
        vp.get_video_reader_backend.cache_clear()
        images, videos = vp.process_vision_info(conversation)
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        return processor(text=[text], images=images, videos=videos, return_tensors="pt")

    return run


def interleaved(ours, theirs, runs: int) -> tuple[float, float, object, object]:
    """Median seconds of each, alternating runs so that load on a shared machine hits both alike."""
    ours_out, theirs_out = ours(), theirs()  # warm-up, and the results to compare
    ours_times, theirs_times = [], []
    for _ in range(runs):
        for fn, times in ((ours, ours_times), (theirs, theirs_times)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(ours_times), statistics.median(theirs_times), ours_out, theirs_out


def same(ours, theirs, grid_key: str, pixel_key: str) -> bool:
    return (torch.equal(ours["input_ids"], theirs["input_ids"]) and torch.equal(ours[grid_key], theirs[grid_key])
            and (ours[pixel_key] - theirs[pixel_key]).abs().max().item() <= 1e-5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(os.path.join(tmp, "model"), preprocessor=HUB)
        image = make_image(os.path.join(tmp, "photo.jpg"))
        video = make_video(os.path.join(tmp, "clip.mp4"), args.seconds, args.fps)
        ours = Processor.from_pretrained(model_dir)
        reference = reference_pipeline(model_dir)
        readers = ["torchvision"]
        try:
            import decord  # noqa: F401

            readers.append("decord")
        except ImportError:
            pass
        prompts = {
            "image 1920x1080": ([{"role": "user", "content": [{"type": "image", "image": image},
                                                             {"type": "text", "text": "Describe."}]}],
                                "image_grid_thw", "pixel_values"),
            f"video {args.seconds} s 720p {args.fps} fps": (
                [{"role": "user", "content": [{"type": "video", "video": video},
                                              {"type": "text", "text": "What happens?"}]}],
                "video_grid_thw", "pixel_values_videos"),
        }
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"torch {torch.__version__} threads {torch.get_num_threads()}")
        print("| input | grid | reference reader | reference (s) | qwen2vl (s) | speed-up |")
        print("|---|---|---|---|---|---|")
        for name, (conversation, grid_key, pixel_key) in prompts.items():
            for reader in readers if "video" in name else readers[:1]:
                ours_time, ref_time, ours_out, ref_out = interleaved(
                    lambda c=conversation: ours(c), lambda c=conversation, r=reader: reference(c, r), args.runs)
                if not same(ours_out, ref_out, grid_key, pixel_key):
                    raise SystemExit(f"{name}: outputs differ from the reference ({reader} reader)")
                grid = "x".join(str(v) for v in ours_out[grid_key][0].tolist())
                print(f"| {name} | {grid} | {reader if 'video' in name else '-'} | {ref_time:.3f} | "
                      f"{ours_time:.3f} | {ref_time / ours_time:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
