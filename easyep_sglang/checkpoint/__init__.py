"""Checkpoints on disk: safetensors streaming, tensor names, the offline pruner, the pruned checkpoint's config block,
weight shapes and the capacity planner."""
