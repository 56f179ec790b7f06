"""What both sweep reports (bench.sweep.report, bench.sweep.same_hardware_report) label, aggregate and cite alike."""

from __future__ import annotations

import statistics


def length_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def setting_label(row: dict) -> str:
    nominal = f"{length_label(row['nominal_input_len'])} in / {length_label(row['nominal_output_len'])} out"
    return f"{nominal} ({row['input_len']}/{row['output_len']} tok)"


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio_text(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def provenance_line(row: dict) -> str:
    """What a sweep measured with: the model, SGLang, the device and MoE kernels, the commit."""
    return (f"Model `{row['model']}` ({row.get('architecture')}, {row.get('model_fingerprint')}); "
            f"SGLang {row['sglang_version']}; device {row['device']} ({row.get('moe_kernel_path')}); "
            f"git {row['git_commit']}.")
