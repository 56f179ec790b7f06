"""The embedded default: the demo server (`python -m easyep_sglang.demo`), tiny test models, the trained demo MoE."""
