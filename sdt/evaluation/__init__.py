"""Evaluation of a checkpoint or a pretrained model (`python evaluate.py`).

- `dispatch`: `evaluate(cfg)`, the one entry; picks the task (lm, reasoning, a CoLa search)
- `loading`: the model, tokenizer, device and data config an evaluation runs on (also used by export, generate,
  the harness and the task evaluations)
- `lm`: language-model metrics per split and routing mode (perplexity, bits per byte, throughput)
- `generation`: measured KV-cache bytes and decode speed against a dense twin; sampled continuations
- `report`, `plots`: the text report and the figures of an LM evaluation

This package file imports nothing, so task modules can import `sdt.evaluation.loading` while `dispatch` imports them.
"""
