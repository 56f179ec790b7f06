"""The paper's experiments in miniature (`python -m bench.reproduce`): the plan (plan.py), the runs (run.py), the
scoring (evaluate.py), the tables and figures (report.py, figures.py)."""
