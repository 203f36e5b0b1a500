"""Turning a submitted request into sequences: tokenize, check lengths, build them.

Runs on a transport thread (the gRPC server's intake threads), neither on the engine
loop's nor on the transport's event loop: tokenizing a long prompt costs seconds that
neither the batch nor other callers' health checks should wait for. A long prompt is
encoded in pieces on several cores (``encode.PromptEncoder``).
"""
from __future__ import annotations

import time
from typing import Callable, List

from mii_core.config.models import GenerateParamsConfig
from mii_core.errors import InvalidGenerateParams
from mii_core.plugins.interfaces import RequestInfo, TokenEvent
from mii_engines.runtime.detokenize import TextStream
from mii_engines.runtime.encode import PromptEncoder
from mii_engines.runtime.requests import Request, Sequence


class Intake:
    """Tokenizes prompts and checks them against what the replica can serve."""

    def __init__(self, tokenizer, context_length: int, cache_tokens: int, replica: int) -> None:
        self.tokenizer = tokenizer
        self.encoder = PromptEncoder.for_tokenizer(tokenizer)
        self.context_length = context_length  # the model's (or max_length)
        self.cache_tokens = cache_tokens  # the longest sequence the KV cache can hold
        self.replica = replica
        self.eos = tokenizer.eos_token_id

    def request(self, request_id: int, prompts: List[str], params: GenerateParamsConfig,
                sink: Callable[[TokenEvent], None]) -> Request:
        """A request with one sequence per prompt; InvalidGenerateParams names the prompt."""
        arrived = time.time()  # TTFT counts the tokenizing: a 4k-token prompt, ~9 ms a core
        limit = min(self.context_length, self.cache_tokens)
        encoded, budgets = [], []
        for index, prompt in enumerate(prompts):
            ids = self.encoder.encode(prompt)
            if not ids:
                raise InvalidGenerateParams(f"prompts[{index}]: the prompt encodes to no tokens")
            budget = params.new_token_budget(len(ids), limit)
            if budget < 1:
                allowed = min(params.max_length or limit, limit)
                raise InvalidGenerateParams(
                    f"prompts[{index}]: the prompt has {len(ids)} tokens, which leaves no room "
                    f"to generate under max_length={params.max_length or limit} (the model "
                    f"accepts {self.context_length} tokens; the limit here is {allowed})")
            encoded.append(ids)
            budgets.append(budget)
        info = RequestInfo(request_id, len(prompts), params, self.replica, arrived,
                           prompt_tokens=[len(ids) for ids in encoded])
        request = Request(info, sink, pending=len(prompts))
        eos = None if params.ignore_eos else self.eos
        request.sequences = [Sequence(request, index, ids, budget, TextStream(self.tokenizer,
                                                                               params.stop), eos)
                             for index, (ids, budget) in enumerate(zip(encoded, budgets))]
        return request
