"""A small DeepSeek-V3 MoE trained on the CPU on three local domains (math, code, prose), and its data sets.

Stages:
    python -m easyep_sglang.demo.trained.train --out DIR [--steps N | --minutes M] [--threads N]
    python -m easyep_sglang.demo.trained.sets --out DIR

The package ships the result: the checkpoint in `easyep_sglang/data/demo_moe/` (with its provenance,
`easyep_build.json`) and the sets in `easyep_sglang/data/demo_sets/`, one JSON object per line:

- `{math,code,prose}_calib.jsonl`, 25 rows each: `{"prompt": str, "response": str}`. A calibration
  driver sends `prompt`, and with --use-responses prefills `prompt + response`. Math prompts are
  `Q: 52-7=? A:` with response ` 45`; code and prose rows split a 256-character training passage
  into a 192-character prompt and a 64-character response.
- `math_eval.jsonl`, 200 rows: `{"problem": "Q: 37+48=? A:", "answer": "85"}`. `problem` is the exact
  text the model is given (the tokenizer adds `<bos>`); a greedy answer is correct when its text up
  to the first newline, stripped, equals `answer`. None of these problems is ever trained on.
- `{code,prose}_eval.jsonl`, 50 rows: `{"text": str}`, 256-character held-out passages for a
  per-domain loss.

Code and prose come from the running interpreter's standard library (sources and docstrings); the
shipped model and sets were made with Python 3.11, and another Python version writes other code/prose rows.
"""
