"""The easyep plugin's settings: what the launcher asks of every SGLang process it starts.

SGLang starts its schedulers and workers as fresh processes, which inherit the environment and nothing else, so
the settings travel as environment variables: `to_env` writes them, `from_env` reads them back in each process.
Imports nothing from SGLang, so the launcher can use it before SGLang is imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

_MASK = "EASYEP_MASK"
_PRUNE = "EASYEP_PRUNE"
_PRUNED_CHECKPOINT = "EASYEP_PRUNED_CHECKPOINT"
_STATS_DIR = "EASYEP_STATS_DIR"
_RUN_DIR = "EASYEP_RUN_DIR"
ENV_NAMES = (_MASK, _PRUNE, _PRUNED_CHECKPOINT, _STATS_DIR, _RUN_DIR)


@dataclass(frozen=True)
class PluginSettings:
    mask: Path | None = None  # the JSON mask the workers apply at load time (absolute)
    prune: bool = False  # with a mask: build only the kept experts instead of masking
    pruned_checkpoint: bool = False  # serve an offline-pruned checkpoint in its source routing space
    stats_dir: Path | None = None  # the workers record calibration statistics and dump them here
    run_dir: Path | None = None  # set by serve.py: the workers check in and leave startup failures here

    def __post_init__(self) -> None:
        if self.prune and self.mask is None:
            raise ValueError("pruning needs a mask: it builds only the experts the mask keeps")

    @property
    def routes_around_experts(self) -> bool:
        """Some experts must never be chosen: a mask, or the pruned ones of an offline-pruned checkpoint."""
        return self.mask is not None or self.pruned_checkpoint

    @property
    def builds_kept_experts_only(self) -> bool:
        return self.prune or self.pruned_checkpoint

    @property
    def changes_the_model(self) -> bool:
        """Whether a worker that ran without the plugin would serve something else than asked."""
        return self.routes_around_experts or self.stats_dir is not None

    def to_env(self) -> dict[str, str]:
        env = {_MASK: self.mask, _STATS_DIR: self.stats_dir, _RUN_DIR: self.run_dir,
               _PRUNE: "1" if self.prune else None, _PRUNED_CHECKPOINT: "1" if self.pruned_checkpoint else None}
        return {key: str(value) for key, value in env.items() if value is not None}

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PluginSettings:
        env = os.environ if env is None else env

        def path(key: str) -> Path | None:
            return Path(env[key]) if env.get(key) else None

        def flag(key: str) -> bool:
            if env.get(key, "") not in ("", "1"):
                raise ValueError(f"{key}={env[key]!r}: expected 1 or unset")
            return env.get(key) == "1"

        return cls(path(_MASK), flag(_PRUNE), flag(_PRUNED_CHECKPOINT), path(_STATS_DIR), path(_RUN_DIR))

    @staticmethod
    def cleared(env: Mapping[str, str]) -> dict[str, str]:
        """`env` without any plugin setting, so that a stale one never reaches a new server."""
        return {key: value for key, value in env.items() if key not in ENV_NAMES}
