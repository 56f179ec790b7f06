"""The method: a model's MoE spec, its routing rules, expert masks, calibration statistics, scoring and selection."""
