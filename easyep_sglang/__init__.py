"""easyep-sglang: EASY-EP domain-specific expert pruning for MoE models served by SGLang.

The pipeline, stage by stage (each command at the top of the package calls the stage's module):

    calibrate   serving/calibrate.py      domain prompts -> per-expert statistics, recorded inside SGLang's worker
    select      core/selection.py         statistics -> scores (core/score.py) -> expert mask (core/mask.py)
    launch      serving/launch.py         serve with the mask, or only its kept experts (sglang_plugin/)
    prune       checkpoint/prune.py       write a checkpoint that holds only the kept experts
    plan        checkpoint/capacity.py    GPUs and KV cache per expert count
    accuracy    eval/accuracy.py          score a served model's answers
"""

__version__ = "0.1.0"
