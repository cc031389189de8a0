"""Hugging Face checkpoint I/O: safetensors (one file or sharded with an index), both key layouts.

Keys on disk are the released layout (``visual.*``, ``model.*``, ``lm_head.*``), which are also our
module paths. transformers >= 4.52 holds the same weights under ``model.visual.*`` and
``model.language_model.*``; a checkpoint saved with those prefixes is mapped back on load.

Loading builds the model on the meta device and fills each parameter straight from the file,
so it costs about one copy of the weights.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import Qwen2VLConfig, dtype_name, parse_dtype

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.md"]


def resolve_checkpoint(path: str | Path) -> Path:
    """A local directory as is; otherwise a hub id ("Qwen/Qwen2-VL-2B-Instruct") downloaded to the HF cache."""
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise NotADirectoryError(f"checkpoint path {local} is a file; pass its directory")
        return local
    text = str(path)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download
        try:
            return Path(snapshot_download(text, allow_patterns=HUB_PATTERNS))
        except Exception as e:  # network, auth or missing repo: say which
            raise FileNotFoundError(f"{text!r} is not a local directory and could not be fetched from the "
                                    f"Hugging Face hub: {type(e).__name__}: {e}") from None
    raise FileNotFoundError(f"checkpoint directory not found: {local}")


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from its index when sharded."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} lists shard(s) that are missing: {', '.join(absent)}")
        return files
    single = directory / SINGLE_FILE
    if single.is_file():
        return [single]
    present = sorted(p.name for p in directory.iterdir())[:20]
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory} (found: {', '.join(present) or 'nothing'}); "
                            "only safetensors checkpoints are supported")


def normalize_key(key: str) -> str:
    """Map transformers >= 4.52 in-memory names to the released layout."""
    if key.startswith("model.visual."):
        return key[len("model."):]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    return key


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_path, _, attr = name.rpartition(".")
    module = model.get_submodule(module_path)
    setattr(module, attr, nn.Parameter(tensor, requires_grad=tensor.is_floating_point()))


def _summary(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


def load_pretrained(cls, path, dtype=None, device=None, progress=None, shard=None):
    """``shard`` (for tensor parallelism) has ``shape(name, full_shape)`` -> the shape this process
    holds and ``read(name, lazy_slice)`` -> that part, read from ``safe_open(...).get_slice``."""
    directory = resolve_checkpoint(path)
    config = Qwen2VLConfig.from_pretrained(directory)
    files = weight_files(directory)
    total = sum(f.stat().st_size for f in files)
    bar = None
    if progress or (progress is None and total > 1 << 30):
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {directory.name}", leave=False)

    def tensors():
        for file in files:
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    if shard is None:
                        yield key, (lambda f=f, key=key: f.get_tensor(key)), file.name
                    else:
                        yield key, (lambda f=f, key=key: shard.read(normalize_key(key), f.get_slice(key))), file.name

    try:
        return build_from_tensors(cls, config, tensors(), dtype, device, f"checkpoint {directory}", bar, shard)
    finally:
        if bar is not None:
            bar.close()


def load_state_dict(cls, config: Qwen2VLConfig, state: dict[str, torch.Tensor], dtype=None, device=None):
    """A model from an in-memory state dict in either key layout (e.g. a transformers model's)."""
    items = ((key, (lambda t=t: t), "state dict") for key, t in state.items())
    return build_from_tensors(cls, config, items, dtype, device, "state dict")


def build_from_tensors(cls, config: Qwen2VLConfig, items, dtype, device, what: str, bar=None, shard=None):
    """Build ``cls(config)`` on the meta device and fill it from ``(key, get_tensor, source)`` items.

    Tensors are read one at a time, so memory stays at about one copy of the weights.
    """
    dtype = parse_dtype(dtype) or parse_dtype(config.torch_dtype) or torch.float32
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = cls(config)
    if config.quantization_config is not None:  # GPTQ / AWQ layers become quantized modules
        from .quant.model import install_quantized
        items = install_quantized(model, config, items, dtype, device, normalize_key)
    expected = dict(model.named_parameters())  # tied lm_head is deduplicated away
    loaded, unexpected, mismatched = set(), [], []
    for key, get, source in items:
        name = normalize_key(key)
        if name not in expected:
            if not (name == "lm_head.weight" and config.text.tie_word_embeddings):
                unexpected.append(f"{key} ({source})")
            continue
        tensor = get()
        want = tuple(expected[name].shape) if shard is None else shard.shape(name, tuple(expected[name].shape))
        if tuple(tensor.shape) != want:
            mismatched.append(f"{key}: file {tuple(tensor.shape)} vs model {want} ({source})")
            continue
        target = dtype if tensor.is_floating_point() else tensor.dtype
        _set_parameter(model, name, tensor.to(device=device, dtype=target))
        loaded.add(name)
        if bar is not None:
            bar.update(tensor.numel() * tensor.element_size())
    missing = sorted(set(expected) - loaded)
    problems = []
    if missing:
        problems.append(f"missing keys: {_summary(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_summary(unexpected)}")
    if mismatched:
        problems.append(f"mis-shaped keys: {_summary(mismatched)}")
    if problems:
        raise ValueError(f"{what} does not fit the model described by its config: " + "; ".join(problems))
    model.tie_weights()
    if config.quantization_config is not None:
        from .quant.model import compact_tied_embedding, release_free_memory
        compact_tied_embedding(model)
        release_free_memory()
    return model.eval()


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for suffix, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def save_pretrained(model, path, max_shard_size: int | str = "5GB") -> None:
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)  # the file records the weights' dtype; the live model's config stays
    config.torch_dtype = dtype_name(model.dtype)
    if _is_quantized(model):
        from .quant.model import quantization_config
        config.extra["quantization_config"] = quantization_config(model)
    config.save(directory)
    state = {name: t.to("cpu").contiguous() for name, t in released_state(model)}
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    for old in list(directory.glob("model*.safetensors")) + list(directory.glob(INDEX_FILE)):
        old.unlink()
    if len(shards) == 1:
        _atomic_save(shards[0], directory / SINGLE_FILE)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _atomic_save(shard, directory / name)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    tmp = directory / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, directory / INDEX_FILE)


def _is_quantized(model) -> bool:
    from .quant.linear import QuantLinear
    return any(isinstance(m, QuantLinear) for m in model.modules())


def released_state(model):
    """(name, tensor) in the released key layout; fused projections are split back into q/k/v, gate/up.

    Quantized layers are written in the GPTQ layout (``qweight``, ``qzeros``, ``scales``, ``g_idx``).
    """
    if _is_quantized(model):
        from .quant.model import quant_state
        yield from quant_state(model)
    for name, param in model.named_parameters():
        t = param.detach()
        prefix, _, leaf = name.rpartition(".")
        if prefix.endswith(".qkv_proj"):
            attn = model.get_submodule(prefix.rpartition(".")[0])
            base = prefix.rpartition(".")[0]
            for part, piece in zip(("q_proj", "k_proj", "v_proj"), t.split(attn.split_sizes)):
                yield f"{base}.{part}.{leaf}", piece
        elif prefix.endswith(".gate_up_proj"):
            base = prefix.rpartition(".")[0]
            for part, piece in zip(("gate_proj", "up_proj"), t.chunk(2)):
                yield f"{base}.{part}.{leaf}", piece
        else:
            yield name, t


def _atomic_save(tensors: dict[str, torch.Tensor], target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.chmod(tmp, 0o644)  # safetensors creates the file readable by its owner only
    os.replace(tmp, target)


@torch.no_grad()
def init_weights(model: nn.Module, std: float, generator: torch.Generator | None = None) -> None:
    """normal(0, std) for linear, conv and embedding weights; zero biases; unit norm weights."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv3d, nn.Embedding)):
            module.weight.normal_(0.0, std, generator=generator)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif type(module).__name__ == "RMSNorm":
            module.weight.fill_(1.0)


def random_init(cls, config: Qwen2VLConfig, dtype=None, device=None, seed=None):
    dtype = parse_dtype(dtype) or parse_dtype(config.torch_dtype) or torch.float32
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = cls(config)
    model.to_empty(device=device)
    model.tie_weights()
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    model.to(dtype)
    init_weights(model, config.text.initializer_range, generator)
    return model.eval()
