"""Quantize a Qwen2VL in place, load quantized checkpoints, and write them (GPTQ layout).

One on-disk format is written: GPTQ (``quant_method="gptq"``, ``checkpoint_format="gptq"``),
per-channel int8 as ``bits=8, group_size=-1``. Reading takes GPTQ (v1 and v2 zeros) and AWQ GEMM.
A layer is quantized on disk when its ``<name>.qweight`` exists; everything else loads as float.
Quantized models are always fused (q/k/v -> ``qkv_proj``, gate/up -> ``gate_up_proj``), the
form the decoder runs fastest in; saving splits the fused layers back into the released names.
"""

from __future__ import annotations

import ctypes
from collections import defaultdict

import torch
from torch import nn

from .formats import from_awq, from_gptq, to_gptq
from .linear import ConcatLinear, Int4Linear, Int8Embedding, QuantLinear, build_linear, quantize_linear
from .weights import QuantWeight, concat

QUANT_LEAVES = ("qweight", "qzeros", "scales", "g_idx")
FUSED = {"self_attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
         "mlp": ("gate_up_proj", ("gate_proj", "up_proj"))}


def quantize_model(model, scheme: str = "int4", group_size: int | None = None, sym: bool = True,
                   lm_head: bool = True, vision: bool = True):
    """Replace the decoder's linear layers (and ``lm_head``, the vision tower's) by quantized ones."""
    if scheme not in ("int8", "int4"):
        raise ValueError(f"unknown quantization scheme {scheme!r}; expected 'int8' or 'int4'")
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("the model is already quantized")
    model.fuse_projections()
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        if not (name.startswith("model.layers.") or (vision and name.startswith("visual."))
                or (lm_head and name == "lm_head")):
            continue
        try:
            model.set_submodule(name, quantize_linear(module, scheme, group_size, sym))
        except ValueError as e:
            raise ValueError(f"cannot quantize {name} ({module.in_features} -> {module.out_features}): {e}") from None
    model.config.extra["quantization_config"] = quantization_config(model)
    compact_tied_embedding(model)
    release_free_memory()
    return model


def compact_tied_embedding(model) -> None:
    """With tied embeddings and an int4 ``lm_head``, the float table serves the lookup only: it becomes
    an :class:`Int8Embedding` (the head keeps its own 4-bit copy); otherwise nothing changes. Not for
    int8: the table's rounding would be its largest error (nano grounding prompt: next-token KL max
    3.5e-5 -> 2.1e-3), where int4's own weights dominate."""
    head, embed = model.lm_head, model.model.embed_tokens
    if not (model.config.text.tie_word_embeddings and isinstance(head, Int4Linear) and isinstance(embed, nn.Embedding)):
        return
    head._parameters.pop("weight", None)  # tie_weights gave the head the float table as ``weight``
    model.model.embed_tokens = Int8Embedding(embed.weight)


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    Quantizing or loading frees many large temporaries (float weights, unpacked integers) between
    long-lived allocations, and glibc keeps those pages (the 2B quantized to int4 in memory: 5.76 GB
    resident before the trim, 1.96 GB after).
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def quantization_config(model) -> dict:
    """The GPTQ ``quantization_config`` describing the model's quantized layers (one bits/group for all)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    per_row = all(m.group_size == m.in_features for m in layers.values())
    kinds = {(m.bits, -1 if per_row else m.group_size) for m in layers.values()}
    if len(kinds) != 1:
        raise ValueError(f"quantized layers mix bits/group sizes {sorted(kinds)}; one setting is written per checkpoint")
    (bits, group_size), = kinds
    middle = 2 ** (bits - 1)
    sym = all(bool((m.quant_weight().zeros == middle).all()) for m in layers.values())
    return {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": bits, "group_size": group_size,
            "sym": sym, "desc_act": any(m.perm is not None for m in layers.values()),
            "lm_head": "lm_head" in layers}


def quant_state(model):
    """(name, tensor) of the quantized layers in the released key layout (fused layers split)."""
    for name, module in model.named_modules():
        parent, _, leaf = name.rpartition(".")
        kind = parent.rpartition(".")[2]
        if isinstance(module, Int8Embedding):  # the table as the lookup computes it
            yield f"{name}.weight", module.table().cpu()
            continue
        if isinstance(module, ConcatLinear):
            for part, piece in zip(FUSED[kind][1], module.parts):
                for key, tensor in to_gptq(piece.quant_weight()).items():
                    yield f"{parent}.{part}.{key}", tensor.cpu().contiguous()
            continue
        if not isinstance(module, QuantLinear) or ".parts." in name:
            continue
        qw = module.quant_weight()
        if kind in FUSED and leaf == FUSED[kind][0]:
            sizes = (model.get_submodule(parent).split_sizes if kind == "self_attn"
                     else [qw.out_features // 2] * 2)
            pieces = zip(FUSED[kind][1], _split(qw, sizes))
        else:
            pieces = [(leaf, qw)]
        for part, piece in pieces:
            for key, tensor in to_gptq(piece).items():
                yield f"{parent}.{part}.{key}", tensor.cpu().contiguous()


def _split(qw: QuantWeight, sizes: list[int]) -> list[QuantWeight]:
    def parts(t):
        return [None] * len(sizes) if t is None else t.split(sizes)
    return [QuantWeight(qw.bits, qw.group_size, q, s, z, b, qw.perm)
            for q, s, z, b in zip(qw.q.split(sizes), qw.scales.split(sizes), qw.zeros.split(sizes), parts(qw.bias))]


def install_quantized(model, config, items, dtype: torch.dtype, device: torch.device, normalize_key):
    """Put the checkpoint's quantized layers into the (meta) ``model``; return the remaining items.

    ``items`` are ``(key, get_tensor, source)``; a layer is quantized when ``<layer>.qweight``
    is among them. Layers are converted to :class:`QuantWeight`, fused where the model fuses,
    and built as :class:`Int8Linear` / :class:`Int4Linear`.
    """
    qc = config.extra["quantization_config"]
    method = qc.get("quant_method")
    bits = qc.get("bits", qc.get("w_bit"))
    group_size = qc.get("group_size", qc.get("q_group_size", -1))
    if method == "awq" and str(qc.get("version", "gemm")).lower() != "gemm":
        raise ValueError(f"AWQ version {qc.get('version')!r} is not supported; only the GEMM packing is")
    if method not in ("gptq", "awq"):
        raise ValueError(f"quantization_config.quant_method {method!r} is not supported; expected 'gptq' or 'awq'")
    if bits not in (4, 8):
        raise ValueError(f"quantization_config.bits {bits!r} is not supported; expected 4 or 8")
    v2 = qc.get("checkpoint_format") == "gptq_v2"
    # The getters only work while the checkpoint's files are open (during the iteration), and
    # which layers are quantized is known only after the last key: read the tensors now, each
    # released once it is used (memory stays at about one copy of the files). They are copied out
    # of the files' memory maps: a view kept by any module would keep a whole file mapped and
    # every page read from it resident (random 2B int4: 2.63 GB resident after load, 1.2 GB of it
    # file pages, against 1.71 GB of tensors).
    store = {}
    for key, get, source in items:
        store[normalize_key(key)] = (get().clone(), source)
    items = [(key, (lambda key=key: store.pop(key)[0]), source) for key, (_, source) in store.items()]
    layers = {key.rpartition(".")[0] for key, _, _ in items if key.endswith(".qweight")}
    grouped: dict[str, dict] = defaultdict(dict)
    rest = []
    for key, get, source in items:
        layer, _, leaf = key.rpartition(".")
        if layer in layers and (leaf in QUANT_LEAVES or leaf == "bias"):
            grouped[layer][leaf] = get
        else:
            rest.append((key, get, source))
    by_parent: dict[str, list[str]] = defaultdict(list)
    for layer in grouped:
        by_parent[layer.rpartition(".")[0]].append(layer)
    for names in by_parent.values():  # one module's layers at a time: unpacked integers never pile up
        weights = {}
        for layer in names:
            tensors = {leaf: get() for leaf, get in grouped.pop(layer).items()}
            if "bias" in tensors:
                tensors["bias"] = tensors["bias"].to(dtype)
            weights[layer] = (from_gptq(tensors, bits, group_size, v2, layer) if method == "gptq"
                              else from_awq(tensors, bits, group_size, layer))
        _install(model, _fuse(weights), dtype, device)
    return rest


def _install(model, weights: dict, dtype: torch.dtype, device: torch.device) -> None:
    for layer, qw in weights.items():
        module = model.get_submodule(layer.rpartition(".")[0]) if "." in layer else model
        leaf = layer.rpartition(".")[2]
        kind = layer.rpartition(".")[0].rpartition(".")[2]
        if kind in FUSED and leaf == FUSED[kind][0]:
            for part in FUSED[kind][1]:
                delattr(module, part)
        try:
            built = (ConcatLinear([build_linear(w, dtype) for w in qw]) if isinstance(qw, list)
                     else build_linear(qw, dtype))
            setattr(module, leaf, built.to(device))
        except ValueError as e:
            raise ValueError(f"{layer}: {e}") from None


def _fuse(weights: dict[str, QuantWeight]) -> dict[str, QuantWeight]:
    """q/k/v and gate/up QuantWeights of one layer -> one fused entry, where all parts are quantized.

    Parts with different act-order permutations stay a list (built as a :class:`ConcatLinear`).
    """
    out = dict(weights)
    for kind, (fused, parts) in FUSED.items():
        for name in [n for n in weights if n.endswith(f".{kind}.{parts[0]}")]:
            base = name.rpartition(".")[0]
            names = [f"{base}.{p}" for p in parts]
            if all(n in weights for n in names):
                group = [weights[n] for n in names]
                perms = [w.perm for w in group]
                same = all(p is None for p in perms) or (
                    all(p is not None for p in perms) and all(torch.equal(p, perms[0]) for p in perms))
                out[f"{base}.{fused}"] = concat(group) if same else group
                for n in names:
                    del out[n]
    return out
