"""What the miniature reproduction runs: its options (ReproduceConfig, and --quick's smoke-run values) and its
configurations, one per table row (Config), in the tables' row order. Nothing here starts a server (bench.reproduce.run
does)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import easyep_sglang
from bench.reproduce.report import DOMAINS
from easyep_sglang.core.score import SCORERS, keep_for_ratio
from easyep_sglang.core.spec import MoESpec

DATA_DIR = Path(easyep_sglang.__file__).parent / "data"
SAMPLE_COUNTS = (1, 3, 5, 10, 25)


@dataclass(frozen=True)
class ReproduceConfig:
    """One reproduction: the API of bench.reproduce.run; every flag of its parser maps onto the field of its name."""
    model_path: Path = DATA_DIR / "demo_moe"
    sets_dir: Path = DATA_DIR / "demo_sets"  # {math,code,prose}_{calib,eval}.jsonl
    out_dir: Path = Path("runs/reproduce")
    methods: tuple[str, ...] = tuple(SCORERS)
    mixed_methods: tuple[str, ...] = ("easy_ep",)  # also run on mixed math+code+prose statistics
    random_seeds: int = 3
    prune_ratios: tuple[float, ...] = (0.5, 0.75)
    sample_counts: tuple[int, ...] = SAMPLE_COUNTS
    use_responses: bool = True  # False: calibrate on the model's own answers (T=0.6)
    num_problems: int = 200
    num_texts: int = 40  # per domain
    max_text_tokens: int = 256
    max_answer_tokens: int = 8
    omp_threads: int = 1  # 0: torch's
    server_args: str = "--mem-fraction-static 0.2"
    servers_ahead: int = 1
    resume: bool = False


@dataclass(frozen=True)
class Config:
    name: str
    method: str  # a SCORERS name, or "full"
    calibration: tuple[str, ...] = ()  # domains whose statistics are scored (mixed when several)
    keep: int | None = None  # uniform experts per MoE layer
    budget: int | None = None  # global expert budget over the MoE layers
    seed: int = 0
    prune_ratio: float = 0.0
    tables: tuple[str, ...] = field(default=("table2",))


def plan(repro: ReproduceConfig, spec: MoESpec) -> list[Config]:
    """Every configuration, in the tables' row order: the full model, then per pruning ratio each method on math
    (random once per seed) and the mixed rows; Table 1's other domains; the per-layer budgets."""
    n_moe = len(spec.moe_layers)
    keeps = [(ratio, keep_for_ratio(1 - ratio, spec)) for ratio in repro.prune_ratios]
    configs = [Config("full", "full", tables=("table2", "table1", "budget"))]
    for i, (ratio, keep) in enumerate(keeps):
        for method in repro.methods:
            easy_ep = method == "easy_ep"
            tables = ("table2",) + (("table1",) if easy_ep and i == 0 else ()) + (("budget",) if easy_ep else ())
            configs += [Config(f"{method}-math-keep{keep}-s{seed}", method, ("math",), keep, None, seed, ratio, tables)
                        for seed in range(repro.random_seeds if method == "random" else 1)]
        configs += [Config(f"{method}-mixed-keep{keep}", method, DOMAINS, keep, None, 0, ratio)
                    for method in repro.mixed_methods]
    ratio, keep = keeps[0]
    configs += [Config(f"easy_ep-{d}-keep{keep}", "easy_ep", (d,), keep, None, 0, ratio, ("table1",))
                for d in DOMAINS[1:]]
    configs += [Config(f"easy_ep-math-budget{keep * n_moe}", "easy_ep", ("math",), None, keep * n_moe, 0, ratio,
                       ("budget",)) for ratio, keep in keeps]
    return configs


# --quick: a smoke run; these replace ReproduceConfig's defaults
QUICK = dict(methods=["easy_ep", "random"], random_seeds=1, prune_ratios=[0.5], num_problems=40, num_texts=8,
             max_text_tokens=128)
