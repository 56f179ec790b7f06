"""Build a model the way an SGLang scheduler builds it, in this process: the launcher's server arguments parsed by
SGLang's prepare_server_args, SGLang's plugins loaded (ours among them), the parallel runtime of a single rank set
up, and SGLang's model loader building the model (the draft model under draft_model_build_scope).

For a test that needs SGLang's own layers without a server: run it in a child process with the launcher's
environment (`launch.prepare` returns both), e.g. `python -c SCRIPT` with tests/ on sys.path.
"""

from __future__ import annotations

import json

from sglang.srt.arg_groups.overrides import resolving_view
from sglang.srt.configs.device_config import DeviceConfig
from sglang.srt.configs.load_config import LoadConfig
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.distributed import bootstrap
from sglang.srt.layers.moe.utils import draft_model_build_scope
from sglang.srt.model_loader import get_model_loader
from sglang.srt.plugins import load_plugins
from sglang.srt.runtime_context import SpawnRanks, publish
from sglang.srt.server_args import PortArgs, prepare_server_args


class Worker:
    def __init__(self, argv_json: str):
        load_plugins()
        self.server_args = prepare_server_args(json.loads(argv_json))
        self.server_args.resolve_once()
        self.cfg = resolving_view(self.server_args)
        publish(self.server_args, role="scheduler", ranks=SpawnRanks(world_rank=0, gpu_id=0))
        port_args = PortArgs.init_new(self.server_args)
        bootstrap.init_parallel_runtime(server_args=self.server_args, device="cpu", dist_port=port_args.nccl_port)

    def load(self, is_draft: bool = False):
        path = self.cfg.speculative_draft_model_path if is_draft else self.cfg.model_path
        config = ModelConfig.from_server_args(self.server_args, model_path=path, is_draft_model=is_draft)
        bootstrap.init_layer_runtime(model_config=config)
        loader = get_model_loader(LoadConfig(), config)
        if not is_draft:
            return loader.load_model(model_config=config, device_config=DeviceConfig("cpu", 0))
        with draft_model_build_scope():
            return loader.load_model(model_config=config, device_config=DeviceConfig("cpu", 0))
