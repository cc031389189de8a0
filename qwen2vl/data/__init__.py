"""Data: the synthetic generator, tokenizer training, metrics and the `qwen2vl eval` verb."""
