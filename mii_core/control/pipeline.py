"""``mii.pipeline``: generation in this process, as DeepSpeed-MII's non-persistent API.

    pipe = mii.pipeline("path/or/hub-name", max_length=2048)
    responses = pipe(["DeepSpeed is", "Seattle is"], max_new_tokens=128)
    pipe.destroy()

The pipeline runs what a replica runs — the engine plugin's load, the KV cache
``kv_cache`` resolves to, rank 0's batching loop on a thread of its own — without the
supervisor, the processes or gRPC. Its keywords are ``ModelConfig`` fields (as in
MII); generate parameters are checked per call, as the client checks them.

One process serves one pipeline: ``tensor_parallel`` > 1 is refused (MII runs such a
pipeline on every rank under the deepspeed launcher; here the persistent
``mii.serve(...)`` starts and drives the ranks itself).
"""
from __future__ import annotations

import threading
from typing import Any, Dict, List, Optional, Union

from mii_core.api.response import Response
from mii_core.config.kwargs import check_prompts, parse_generate_kwargs, parse_pipeline_kwargs
from mii_core.config.models import ModelConfig
from mii_core.deploy.devices import count_local_gpus
from mii_core.deploy.model_source import check_tensor_parallel, model_dir_config
from mii_core.errors import ConfigError, DeploymentUnavailable, ServerError
from mii_core.plugins.discovery import load_driver, resolve_engine_name
from mii_core.plugins.interfaces import RankInfo, TokenEvent

# A pipeline call hands all its prompts to the loop at once; the loop's queue limit is
# for a server's many clients, not for one caller's list.
QUEUE_LIMIT = 1 << 30


class MIIPipeline:
    """The model loaded in this process; call it with prompts, ``destroy()`` it when done."""

    def __init__(self, model_config: ModelConfig, all_rank_output: bool = False) -> None:
        from mii_engines.runtime import service

        if model_config.tensor_parallel > 1:
            raise ConfigError(
                f"tensor_parallel={model_config.tensor_parallel}: mii.pipeline runs in one "
                "process; use mii.serve(...) for tensor parallelism (it starts the ranks)")
        check_tensor_parallel(model_dir_config(model_config), model_config.tensor_parallel)
        model_config.engine = resolve_engine_name(model_config)
        self.model_config = model_config
        self.all_rank_output = all_rank_output  # MII's keyword; one rank here, so no effect
        device = "cuda:0" if count_local_gpus() else "cpu"
        rank = RankInfo(replica=0, rank=0, world_size=1, local_rank=0, device=device,
                        dist_port=0)
        engine = load_driver("engine", model_config.engine)()
        self._loaded = engine.load(model_config, rank)
        self._loop = service.build_service(self._loaded, model_config, rank, QUEUE_LIMIT)
        self._thread = threading.Thread(target=self._loop.run, name="mii-pipeline", daemon=True)
        self._thread.start()

    def __call__(self, prompts: Union[str, List[str]], **generate_kwargs: Any) -> List[Response]:
        """One Response per prompt, in order (MII's ``MIIPipeline.__call__``)."""
        if self._loop is None:
            raise DeploymentUnavailable("the pipeline was destroyed")
        if self._loop.failed is not None:
            raise ServerError(f"the pipeline's engine failed: {self._loop.failed!r}")
        prompts = check_prompts(prompts)
        params = parse_generate_kwargs(generate_kwargs)
        collected = _Collected(len(prompts))
        handle = self._loop.submit(prompts, params, collected.add)
        try:
            while not collected.done.wait(0.5):
                if self._loop.failed is not None or not self._thread.is_alive():
                    raise ServerError(f"the pipeline's engine stopped: {self._loop.failed!r}")
        except BaseException:  # Ctrl-C or a failed engine: free the rows
            handle.cancel()
            raise
        return collected.responses()

    def destroy(self) -> None:
        """Stop the loop and release the model and its KV cache (GPU memory)."""
        if self._loop is None:
            return
        self._loop.stop()
        self._thread.join(timeout=60)
        self._loop = None
        self._loaded = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is a dependency
            pass


class _Collected:
    """Gathers one call's token events into Responses."""

    def __init__(self, count: int) -> None:
        self.texts: Dict[int, List[str]] = {i: [] for i in range(count)}
        self.final: Dict[int, TokenEvent] = {}
        self.errors: List[str] = []
        self.done = threading.Event()
        self._count = count

    def add(self, event: TokenEvent) -> None:
        self.texts[event.index].append(event.text)
        if event.finish_reason:
            self.final[event.index] = event
            if event.error is not None:
                self.errors.append(f"prompt {event.index} failed: {event.error}")
            if len(self.final) == self._count:
                self.done.set()

    def responses(self) -> List[Response]:
        if self.errors:
            raise ServerError("; ".join(self.errors))
        return [Response(generated_text="".join(self.texts[i]),
                         prompt_length=self.final[i].prompt_length,
                         generated_length=self.final[i].token_count,
                         finish_reason=self.final[i].finish_reason or "", index=i,
                         time_to_first_token_s=self.final[i].time_to_first_token_s,
                         total_time_s=self.final[i].total_time_s)
                for i in range(self._count)]


def pipeline(model_name_or_path: str = "", model_config: Optional[Dict[str, Any]] = None,
             all_rank_output: bool = False, **kwargs: Any) -> MIIPipeline:
    """Load a model for in-process generation (DeepSpeed-MII's ``mii.pipeline``)."""
    config = parse_pipeline_kwargs(model_name_or_path, model_config, **kwargs)
    return MIIPipeline(config, all_rank_output=all_rank_output)
