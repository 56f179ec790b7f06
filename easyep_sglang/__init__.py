"""easyep-sglang: EASY-EP domain-specific expert pruning for MoE models served by SGLang."""

__version__ = "0.1.0"
