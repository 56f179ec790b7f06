"""The throughput sweep (`python -m bench.sweep`): what it serves (plan.py), on which shape (same_hardware.py), its
measurements (run.py) and reports (report.py, same_hardware_report.py, cells.py)."""
