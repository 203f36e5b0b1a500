"""``MIIClient``: talks to a persistent deployment, as DeepSpeed-MII's client does.

Generate parameters, prompts (against the deployment's request limits) and timeouts are
validated here, before anything is sent.
"""
from __future__ import annotations

import os
import time
from typing import Any, AsyncIterator, Callable, Dict, Iterator, List, Optional, Union

from mii_core.api.response import Response
from mii_core.config.kwargs import check_prompts, check_timeout, parse_generate_kwargs
from mii_core.config.models import MIIConfig
from mii_core.deploy import registry
from mii_core.errors import DeploymentUnavailable, InvalidGenerateParams
from mii_core.plugins.discovery import load_driver

Prompts = Union[str, List[str]]


class MIIClient:
    """Client of the deployment described by ``mii_config``, reached at ``host``.

    ``port`` defaults to ``mii_config.port_number``; ``timeout`` (seconds, at most
    ``MAX_TIMEOUT_S``; None: no deadline) bounds every call unless a call passes its
    own; requests beyond the config's ``max_prompts_per_request`` / ``max_request_bytes``
    are refused here, before they are sent; ``token`` (default: the config's
    ``auth_token``, then ``$MII_AUTH_TOKEN``) authenticates every call;
    ``tls_root_cert`` (default: the config's ``tls_cert_file``) turns on TLS.
    """

    def __init__(self, mii_config: MIIConfig, host: str = "localhost",
                 port: Optional[int] = None, timeout: Optional[float] = None,
                 token: Optional[str] = None, tls_root_cert: Optional[str] = None) -> None:
        self.mii_config = mii_config
        self.task = mii_config.model_conf.task
        self.host = host
        self.port = port or mii_config.port_number
        self.timeout = check_timeout(timeout)
        transport = load_driver("transport", mii_config.transport)()
        token = token or mii_config.auth_token or os.environ.get("MII_AUTH_TOKEN") or None
        tls_root_cert = tls_root_cert or mii_config.tls_cert_file
        self._conn = transport.connect(host, self.port, token, tls_root_cert)
        self._terminated = False

    @property
    def deployment_name(self) -> str:
        """Name of the deployment."""
        return self.mii_config.deployment_name

    def _check_open(self) -> None:
        if self._terminated:
            raise DeploymentUnavailable(f"deployment {self.deployment_name!r} is not running: "
                                        "it was terminated by this client")

    def _prompts(self, prompts: Prompts) -> List[str]:
        return check_prompts(prompts, self.mii_config)

    def _timeout(self, timeout: Optional[float]) -> Optional[float]:
        """A call's own timeout (checked), else the client's."""
        return self.timeout if timeout is None else check_timeout(timeout)

    def __call__(self, *args: Any, **kwargs: Any) -> List[Response]:
        """Same as :meth:`generate`."""
        return self.generate(*args, **kwargs)

    def generate(self, prompts: Prompts,
                 streaming_fn: Optional[Callable[[List[Response]], Any]] = None,
                 timeout: Optional[float] = None, **generate_kwargs: Any) -> List[Response]:
        """Generate for one prompt or a list; returns one Response per prompt.

        With ``streaming_fn`` (one prompt only, as in MII) it is called with each
        increment as a one-element list of Response, as MII's is (MII code reads
        ``response[0].generated_text``); the final Responses are still returned (MII
        returns None there).
        """
        self._check_open()
        prompts = self._prompts(prompts)
        params = parse_generate_kwargs(generate_kwargs)
        timeout = self._timeout(timeout)
        if streaming_fn is None:
            return self._conn.generate(prompts, params, timeout)
        if len(prompts) > 1:
            raise InvalidGenerateParams("streaming_fn: streaming supports a single prompt; "
                                        f"got {len(prompts)} prompts")
        return _collect(self._stream(prompts, params, timeout), len(prompts), streaming_fn)

    def stream(self, prompts: Prompts, timeout: Optional[float] = None,
               **generate_kwargs: Any) -> Iterator[Response]:
        """Iterate over incremental Responses (``.index`` names the prompt; the last
        Response of each prompt has its ``finish_reason`` set)."""
        self._check_open()
        prompts = self._prompts(prompts)
        return self._stream(prompts, parse_generate_kwargs(generate_kwargs),
                            self._timeout(timeout))

    def _stream(self, prompts: List[str], params, timeout: Optional[float]) -> Iterator[Response]:
        params = params.model_copy(update={"stream": True})
        return self._conn.stream(prompts, params, timeout)

    async def agenerate(self, prompts: Prompts, timeout: Optional[float] = None,
                        **generate_kwargs: Any) -> List[Response]:
        """:meth:`generate` for asyncio code."""
        self._check_open()
        prompts = self._prompts(prompts)
        return await self._conn.agenerate(prompts, parse_generate_kwargs(generate_kwargs),
                                          self._timeout(timeout))

    async def astream(self, prompts: Prompts, timeout: Optional[float] = None,
                      **generate_kwargs: Any) -> AsyncIterator[Response]:
        """:meth:`stream` for asyncio code."""
        self._check_open()
        prompts = self._prompts(prompts)
        params = parse_generate_kwargs(generate_kwargs).model_copy(update={"stream": True})
        async for chunk in self._conn.astream(prompts, params, self._timeout(timeout)):
            yield chunk

    def info(self) -> Dict[str, Any]:
        """The deployment's description and counters (per replica)."""
        self._check_open()
        return self._conn.info()

    def is_serving(self) -> bool:
        """True if the deployment answers its health check."""
        return not self._terminated and self._conn.is_serving()

    def terminate_server(self, wait: float = 30.0) -> None:
        """Stop the whole deployment (every process) and wait until it is gone."""
        self._check_open()
        record = registry.load(self.deployment_name)
        self._conn.terminate()
        self._terminated = True
        deadline = time.time() + wait
        while time.time() < deadline:
            local_gone = record is None or not registry.supervisor_alive(record)
            if local_gone and not self._conn.is_serving(timeout=0.2):
                break
            time.sleep(0.05)
        else:
            raise DeploymentUnavailable(f"deployment {self.deployment_name!r} did not stop "
                                        f"within {wait}s")
        self._conn.close()


def _collect(chunks: Iterator[Response], count: int,
             callback: Callable[[List[Response]], Any]) -> List[Response]:
    texts: Dict[int, List[str]] = {i: [] for i in range(count)}
    final: Dict[int, Response] = {}
    for chunk in chunks:
        callback([chunk])
        texts[chunk.index].append(chunk.generated_text)
        if chunk.finish_reason not in ("none", ""):
            final[chunk.index] = chunk
    results = []
    for index in range(count):
        last = final[index]
        results.append(Response(generated_text="".join(texts[index]),
                                prompt_length=last.prompt_length,
                                generated_length=last.generated_length,
                                finish_reason=last.finish_reason, index=index,
                                replica=last.replica,
                                time_to_first_token_s=last.time_to_first_token_s,
                                total_time_s=last.total_time_s))
    return results
