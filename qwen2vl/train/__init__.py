"""Training: the paper's three stages, packing, LoRA, FSDP2 under torchrun, exact resume, HF export.

``qwen2vl train --config run.yaml [--key value]...`` (see :mod:`qwen2vl.train.cli`); the pieces:
``options`` (keys), ``records`` + ``dataset`` (JSONL -> encoded samples), ``packing`` (rows of
several samples), ``loss`` (the training forward), ``stages`` + ``lora`` (what trains), ``optim``,
``distributed`` (FSDP2), ``checkpointing``, ``export``, ``metrics``, ``trainer`` (the loop).
"""
