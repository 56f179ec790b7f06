"""SGLang's own expert-distribution recorder, used as an independent witness of routing choices.

Start the server with `RECORDER_SERVER_ARGS` and `RECORDER_DIR_ENV` pointing at a fresh folder;
`record_expert_counts` then returns how often each logical expert was chosen while `workload` ran.
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path
from typing import Callable

import torch

RECORDER_SERVER_ARGS = ["--expert-distribution-recorder-mode", "stat"]
RECORDER_DIR_ENV = "SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR"
DUMP_WAIT_S = 10.0


def _post(base_url: str, path: str, api_key: str | None) -> None:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    request = urllib.request.Request(base_url + path, data=b"", headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=120) as resp:
        assert resp.status == 200, f"{path} answered {resp.status}"


def record_expert_counts(base_url: str, dump_dir: str | Path, workload: Callable[[], None],
                         api_key: str | None = None, dp_size: int = 1) -> torch.Tensor:
    """Choices per (layer, logical expert) during `workload`, summed over steps.  # [num_layers, E]

    In "stat" mode the counts are all-reduced over ranks, so under TP each token counts once per rank.
    `dp_size`: the server's --dp-size; each replica (TP=1) dumps the counts of its own tokens, which are summed.
    `api_key`: the server's --api-key, which also guards these endpoints.
    """
    dump_dir = Path(dump_dir)
    before = set(dump_dir.glob("expert_distribution_recorder_*.pt"))
    _post(base_url, "/start_expert_distribution_record", api_key)
    try:
        workload()
    finally:
        _post(base_url, "/stop_expert_distribution_record", api_key)
    _post(base_url, "/dump_expert_distribution_record", api_key)
    deadline = time.monotonic() + DUMP_WAIT_S  # the other ranks' files may come after the endpoint answered
    while len(dumps := sorted(set(dump_dir.glob("expert_distribution_recorder_*.pt")) - before)) < dp_size:
        assert time.monotonic() < deadline, f"{len(dumps)} dumps in {dump_dir}, expected {dp_size} at least"
        time.sleep(0.2)
    counts = [_logical_counts(d) for d in dumps]
    if dp_size > 1:
        return torch.stack(counts).sum(dim=0)
    assert all(torch.equal(c, counts[0]) for c in counts), "TP workers dumped different counts"  # all-reduced
    return counts[0]


def _logical_counts(dump: Path) -> torch.Tensor:
    """[L, E] counts of one worker's dump. The dump endpoint answers once the first rank has dumped; another may
    still be writing its file, so a file that ends early is read again, for up to DUMP_WAIT_S."""
    deadline = time.monotonic() + DUMP_WAIT_S
    while True:
        try:
            return torch.load(dump, map_location="cpu", weights_only=True)["logical_count"].sum(dim=0)  # [steps, L, E]
        except (EOFError, RuntimeError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
