"""The REST gateway (enable_restful_api=True): real clients (openai, httpx) against a real
deployment of the tiny model, through the gateway process the supervisor starts."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket

import httpx
import openai
import pytest
from conftest import (
    Hooks,
    deployed,
    listening,
    ours_listening,
    queue_depth,
    serve,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families

from mii_core.deploy import registry

GREEDY = dict(do_sample=False, max_new_tokens=12)
REST_HOST = "127.0.0.3"  # restful_api_host: a loopback address of its own


@pytest.fixture(scope="module")
def gw_hooks(tmp_path_factory):
    return Hooks(tmp_path_factory.mktemp("rest-hooks"))


@pytest.fixture(scope="module")
def gw(tiny_model, tmp_path_factory, gw_hooks):
    """A module-wide deployment with the gateway on (bound to ``REST_HOST``, on a port the
    deployment got); yields (client, base URL, name)."""
    name = f"rest-{tmp_path_factory.mktemp('rest').name}"
    with deployed(tiny_model, name, hooks=gw_hooks, engine="transformers",
                  enable_restful_api=True, restful_api_host=REST_HOST) as client:
        yield client, f"http://{REST_HOST}:{client.mii_config.restful_api_port}", name


@pytest.fixture(scope="module")
def oai(gw):
    client, base, name = gw
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)


def metric_families(base: str) -> dict:
    reply = httpx.get(f"{base}/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain; version=")
    return {f.name: f for f in text_string_to_metric_families(reply.text)}


def sample(families: dict, family: str, name: str = "", **labels) -> float:
    matches = [s.value for s in families[family].samples
               if s.name == (name or family) and s.labels == labels]
    assert len(matches) == 1, (family, name, labels, families[family].samples)
    return matches[0]


# -- DeepSpeed-MII's RESTful API --------------------------------------------------------
def test_mii_route_answers_like_the_client(gw):
    client, base, name = gw
    prompts = ["DeepSpeed is", "Seattle is"]
    reply = httpx.post(f"{base}/mii/{name}", json={"prompts": prompts, **GREEDY}, timeout=60)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    direct = client(prompts, **GREEDY)
    assert [r["generated_text"] for r in body] == [r.generated_text for r in direct]
    for item, response in zip(body, direct):
        assert {"generated_text", "prompt_length", "generated_length",
                "finish_reason"} <= set(item)
        assert item["prompt_length"] == response.prompt_length
        assert item["generated_length"] == response.generated_length
    one = httpx.post(f"{base}/mii/{name}", json={"prompts": "DeepSpeed is", **GREEDY}, timeout=60)
    assert one.json()[0]["generated_text"] == direct[0].generated_text


@pytest.mark.parametrize("body, status, param, text", [
    ({"prompts": "hi", "max_new_tokens": 0}, 400, "max_new_tokens", "greater than 0"),
    ({"prompts": "hi", "top_p": 2}, 400, "top_p", "top_p"),
    ({"prompts": "hi", "max_new_token": 5}, 400, "max_new_token", "did you mean"),
    ({"prompts": []}, 400, "prompts", "empty"),
    ({"prompts": ["ok", 3]}, 400, "prompts", "prompts[1]"),
    ({"max_new_tokens": 4}, 400, "prompts", "prompts"),
    ([1, 2], 400, None, "JSON object"),
    ({"prompts": "hi", "stream": True}, 400, "stream", "/v1/completions"),
    ({"prompts": "hi", "self": 1}, 400, "self", "not recognized"),  # was a TypeError: a 500
    ({"prompts": "hi", "timeout": 1e10}, 400, "timeout", "at most 86400"),  # was a 504
    ({"prompts": "hi", "timeout": 2 ** 70}, 400, "timeout", "at most 86400"),
])
def test_mii_route_rejects_bad_input_naming_the_field(gw, body, status, param, text):
    client, base, name = gw
    reply = httpx.post(f"{base}/mii/{name}", json=body, timeout=30)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and text in error["message"]
    assert error["type"] in ("InvalidGenerateParams", "UnknownArgument")


def test_mii_route_unknown_deployment_and_bad_json(gw):
    client, base, name = gw
    reply = httpx.post(f"{base}/mii/not-{name}", json={"prompts": "hi"})
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "deployment_not_found"
    reply = httpx.post(f"{base}/mii/{name}", content=b"{not json",
                       headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]
    assert httpx.get(f"{base}/mii/{name}").status_code == 405


def test_the_gateway_process_takes_json_only_within_its_limits(gw):
    """Bodies not sent as JSON are 415, bodies over MAX_BODY_BYTES 413 before they are
    read, JSON too deep or timeouts beyond the wire 400, never a plain-text 500 or a 504
    (tests/unit/test_gateway_guard.py has the rest, with short limits)."""
    from mii_core.gateway.limits import MAX_BODY_BYTES

    client, base, name = gw
    for path in (f"/mii/{name}", "/v1/completions"):
        reply = httpx.post(f"{base}{path}", content=b'{"prompts": "hi"}',
                           headers={"content-type": "text/plain"})
        assert reply.status_code == 415, reply.text
        assert reply.json()["error"]["code"] == "unsupported_content_type"
        reply = httpx.post(f"{base}{path}", content=b"[" * 100_000 + b"]" * 100_000,
                           headers={"content-type": "application/json"})
        assert reply.status_code == 400 and "deeper than" in reply.json()["error"]["message"]
    for timeout in (b"NaN", b"Infinity", b"-1"):
        reply = httpx.post(f"{base}/mii/{name}", content=b'{"prompts": "hi", "timeout": %s}'
                           % timeout, headers={"content-type": "application/json"})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "timeout"
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /mii/{name} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     f"\r\nContent-Length: {10 * 2 ** 20}\r\n\r\n".encode())  # 10 MiB to come
        data = b""
        while chunk := sock.recv(65536):  # answered and closed at once
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ") and b"connection: close" in head.lower()
    assert f"limit of {MAX_BODY_BYTES} bytes" in json.loads(body)["error"]["message"]
    assert client("still serving", max_new_tokens=2)[0].generated_length >= 1


# -- OpenAI-compatible API --------------------------------------------------------------
def test_openai_completions_match_the_client(gw, oai):
    client, base, name = gw
    direct = client("DeepSpeed is", **GREEDY)[0]
    reply = oai.completions.create(model=name, prompt="DeepSpeed is", max_tokens=12,
                                   temperature=0)
    assert reply.object == "text_completion" and reply.model == name
    assert reply.choices[0].text == direct.generated_text
    assert reply.choices[0].finish_reason == direct.finish_reason
    assert reply.usage.prompt_tokens == direct.prompt_length
    assert reply.usage.completion_tokens == direct.generated_length
    assert reply.usage.total_tokens == direct.prompt_length + direct.generated_length
    # a list of prompts: one choice per prompt, in order; echo prepends the prompt
    batch = oai.completions.create(model=name, prompt=["DeepSpeed is", "Seattle is"],
                                   max_tokens=12, temperature=0, echo=True)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == "DeepSpeed is" + direct.generated_text
    # sampling parameters take effect: top_k=1 (an extension) or a tiny top_p leave only
    # the most likely token, so sampling at any temperature gives the greedy text
    for options in (dict(extra_body={"top_k": 1}), dict(top_p=1e-6)):
        sampled = oai.completions.create(model=name, prompt="DeepSpeed is", max_tokens=12,
                                         temperature=1.5, **options)
        assert sampled.choices[0].text == direct.generated_text, options
    # a stop string cuts the text before its first occurrence and ends generation there
    text = direct.generated_text
    assert len(text) >= 6, text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    stopped = oai.completions.create(model=name, prompt="DeepSpeed is", max_tokens=12,
                                     temperature=0, stop=[stop])
    assert stopped.choices[0].text == text[:text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens < direct.generated_length


def test_a_seed_reproduces_sampled_text_on_both_routes(gw, oai):
    """seed (OpenAI's field; on MII's route a generate parameter) fixes a sampled
    request's draws: the same seed gives the same text, through gRPC too."""
    client, base, name = gw
    sampled = dict(do_sample=True, temperature=2.0, top_p=1.0, max_new_tokens=16,
                   ignore_eos=True)
    direct = client("DeepSpeed is", seed=11, **sampled)[0].generated_text
    for _ in range(2):
        reply = httpx.post(f"{base}/mii/{name}",
                           json={"prompts": "DeepSpeed is", "seed": 11, **sampled}, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()[0]["generated_text"] == direct
    texts = {oai.completions.create(model=name, prompt="DeepSpeed is", max_tokens=16,
                                    temperature=2.0, seed=seed,
                                    extra_body={"ignore_eos": True}).choices[0].text
             for seed in (11, 11, 12)}
    assert direct in texts and len(texts) == 2
    bad = httpx.post(f"{base}/v1/completions", json={"model": name, "prompt": "hi",
                                                     "seed": -1}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "seed"


def test_openai_completions_stream(gw, oai):
    client, base, name = gw
    whole = oai.completions.create(model=name, prompt="DeepSpeed is", max_tokens=12,
                                   temperature=0)
    chunks = list(oai.completions.create(model=name, prompt="DeepSpeed is", max_tokens=12,
                                         temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 1
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_raw_sse_framing(gw):
    client, base, name = gw
    with httpx.stream("POST", f"{base}/v1/completions", timeout=60, json={
            "model": name, "prompt": "DeepSpeed is", "max_tokens": 4, "stream": True}) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        raw = reply.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_openai_chat_uses_the_chat_template(gw, oai, tiny_model):
    from transformers import AutoTokenizer

    client, base, name = gw
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is DeepSpeed?"}]
    prompt = AutoTokenizer.from_pretrained(tiny_model).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    direct = client(prompt, **GREEDY)[0]
    reply = oai.chat.completions.create(model=name, messages=messages, max_tokens=12,
                                        temperature=0)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == direct.generated_text
    assert reply.usage.prompt_tokens == direct.prompt_length
    assert reply.usage.completion_tokens == direct.generated_length
    # streaming: a role delta first, then content deltas that add up to the same text
    chunks = list(oai.chat.completions.create(model=name, messages=messages, max_tokens=12,
                                              temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == direct.generated_text
    assert chunks[-1].choices[0].finish_reason == direct.finish_reason
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    # content given as text parts, and the model named by its path, work too
    parts = oai.chat.completions.create(
        model=tiny_model, max_completion_tokens=12, temperature=0,
        messages=[messages[0], {"role": "user", "content": [
            {"type": "text", "text": "What is "}, {"type": "text", "text": "DeepSpeed?"}]}])
    assert parts.choices[0].message.content == direct.generated_text


def test_openai_models(gw, oai):
    client, base, name = gw
    assert [m.id for m in oai.models.list().data] == [name]
    assert oai.models.retrieve(name).id == name
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("no-such-model")


@pytest.mark.parametrize("kwargs, param, text", [
    (dict(max_tokens=0), "max_tokens", "at least 1"),
    (dict(temperature=-1), "temperature", "between 0 and 2"),
    (dict(n=2), "n", "n=1"),
    (dict(logprobs=2), "logprobs", "not supported"),
    (dict(stop=[""]), "stop", "must not be empty"),
    (dict(extra_body={"min_tokens": 20}, max_tokens=4), None, "min_tokens (20) must not "
     "exceed max_tokens (4)"),
    (dict(extra_body={"bogus": 1}), "bogus", "unknown parameter"),
    (dict(prompt=[1, 2, 3]), "prompt[0]", "token-id"),
])
def test_openai_bad_params_are_400_naming_the_field(gw, oai, kwargs, param, text):
    client, base, name = gw
    kwargs = dict(model=name, prompt="DeepSpeed is", **kwargs) if "prompt" not in kwargs \
        else dict(model=name, **kwargs)
    with pytest.raises(openai.BadRequestError) as caught:
        oai.completions.create(**kwargs)
    assert caught.value.status_code == 400
    error = caught.value.body
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and text in error["message"], error


def test_openai_errors_have_openai_shape_and_codes(gw, oai):
    client, base, name = gw
    with pytest.raises(openai.NotFoundError) as caught:
        oai.completions.create(model="gpt-4", prompt="hi")
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=name, messages=[{"role": "wizard", "content": "x"}])
    assert caught.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as caught:  # a prompt longer than the model
        oai.completions.create(model=name, prompt="DeepSpeed is " * 400, max_tokens=4)
    assert caught.value.body["param"] == "prompt" and "tokens" in caught.value.body["message"]
    # streaming requests that fail before the first token still get a status code
    reply = httpx.post(f"{base}/v1/completions", json={"model": name, "prompt": "x",
                                                       "stream": True, "max_tokens": -3})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "max_tokens"
    for method, path in (("GET", "/nope"), ("DELETE", "/v1/models")):
        reply = httpx.request(method, f"{base}{path}")
        assert reply.status_code in (404, 405)
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}


def test_sixteen_concurrent_requests_all_succeed(gw):
    client, base, name = gw
    expected = client("Seattle is", **GREEDY)[0].generated_text

    async def run():
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as http:
            calls = []
            for i in range(16):
                if i % 2:
                    calls.append(http.post("/v1/completions", json={
                        "model": name, "prompt": "Seattle is", "max_tokens": 12,
                        "temperature": 0}))
                else:
                    calls.append(http.post(f"/mii/{name}", json={"prompts": "Seattle is",
                                                                  **GREEDY}))
            return await asyncio.gather(*calls)

    replies = asyncio.run(run())
    assert [r.status_code for r in replies] == [200] * 16
    texts = [r.json()[0]["generated_text"] if isinstance(r.json(), list)
             else r.json()["choices"][0]["text"] for r in replies]
    assert texts == [expected] * 16


def test_client_leaving_a_stream_cancels_it_and_frees_its_slot(gw):
    client, base, name = gw

    def cancelled():
        return sample(metric_families(base), "mii_replica_requests",
                      "mii_replica_requests_total", replica="0", outcome="cancelled")

    before = cancelled()
    with httpx.stream("POST", f"{base}/v1/completions", timeout=60, json={
            "model": name, "prompt": "DeepSpeed is", "max_tokens": 400, "ignore_eos": True,
            "stream": True}) as reply:
        lines = reply.iter_lines()
        assert next(lines).startswith("data: ")  # then hang up mid-stream
    assert wait_until(lambda: cancelled() == before + 1, 15)
    assert wait_until(lambda: sample(metric_families(base),
                                     "mii_gateway_in_flight_requests") == 0, 5)


# -- health, metrics, no terminate route -------------------------------------------------
def test_health(gw):
    client, base, name = gw
    reply = httpx.get(f"{base}/health")
    assert reply.status_code == 200 and reply.json() == {"status": "ok", "deployment": name}
    assert httpx.get(f"{base}/healthz").status_code == 200


def test_gateway_binds_restful_api_host_only(gw):
    client, base, name = gw
    gateway = registry.load(name).pids["rest-gateway"]
    assert listening(gateway) == {(REST_HOST, client.mii_config.restful_api_port)}


def test_metrics_per_replica_and_aggregated(gw):
    client, base, name = gw
    before = metric_families(base)
    ok_before = sample(before, "mii_replica_requests", "mii_replica_requests_total",
                       replica="0", outcome="ok")
    for _ in range(3):
        assert httpx.post(f"{base}/v1/completions", timeout=60, json={
            "model": name, "prompt": "DeepSpeed is", "max_tokens": 4,
            "ignore_eos": True}).status_code == 200
    families = metric_families(base)
    assert sample(families, "mii_deployment_up") == 1
    assert sample(families, "mii_replicas") == 1 and sample(families, "mii_replicas_healthy") == 1
    assert sample(families, "mii_replica_healthy", replica="0") == 1
    ok = sample(families, "mii_replica_requests", "mii_replica_requests_total",
                replica="0", outcome="ok")
    assert ok == ok_before + 3
    assert sample(families, "mii_requests", "mii_requests_total", outcome="ok") == ok
    tokens = sample(families, "mii_replica_tokens_generated",
                    "mii_replica_tokens_generated_total", replica="0")
    assert tokens >= 12 and tokens == sample(families, "mii_tokens_generated",
                                             "mii_tokens_generated_total")
    assert sample(families, "mii_replica_queue_depth", replica="0") == 0
    assert sample(families, "mii_running_batch_size") == 0
    for base_name in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                      "end_to_end_latency_seconds"):
        for family, labels in ((f"mii_replica_{base_name}", {"replica": "0"}),
                               (f"mii_{base_name}", {})):
            assert families[family].type == "histogram"
            buckets = [s for s in families[family].samples if s.name == f"{family}_bucket"
                       and {k: v for k, v in s.labels.items() if k != "le"} == labels]
            counts = [s.value for s in buckets]
            assert counts == sorted(counts) and buckets[-1].labels["le"] == "+Inf"
            assert counts[-1] == sample(families, family, f"{family}_count", **labels) > 0
    assert sample(families, "mii_replica_routed_requests", "mii_replica_routed_requests_total",
                  replica="0") >= 3
    assert sample(families, "mii_gateway_requests", "mii_gateway_requests_total",
                  route="/v1/completions", code="200") >= 3
    assert sample(families, "mii_gateway_in_flight_requests") == 0
    assert sample(families, "mii_gateway_max_in_flight_requests") == 32


def test_no_terminate_route(gw):
    client, base, name = gw
    for method in ("GET", "POST"):
        for path in ("/terminate", f"/mii/{name}/terminate", "/v1/terminate", "/shutdown"):
            assert httpx.request(method, f"{base}{path}").status_code in (404, 405)
    assert httpx.get(f"{base}/health").status_code == 200
    assert client.is_serving()


# -- lifecycle -----------------------------------------------------------------------------
def test_killed_gateway_is_restarted_on_the_same_port(gw):
    client, base, name = gw
    old = registry.load(name).pids["rest-gateway"]
    os.kill(old, signal.SIGKILL)
    assert wait_until(lambda: registry.load(name).pids["rest-gateway"] != old)

    def answers():
        try:
            return httpx.get(f"{base}/health").status_code == 200
        except httpx.TransportError:
            return False

    assert wait_until(answers)
    reply = httpx.post(f"{base}/mii/{name}", json={"prompts": "DeepSpeed is", "ignore_eos": True,
                                                    **GREEDY})
    assert reply.status_code == 200 and reply.json()[0]["generated_length"] == 12


def test_unavailable_deployment_is_503_and_deadline_is_504(gw, gw_hooks):
    client, base, name = gw
    with gw_hooks.held(client):  # nothing can finish: the deadline passes for certain
        reply = httpx.post(f"{base}/mii/{name}", timeout=60, json={
            "prompts": "DeepSpeed is", "max_new_tokens": 4, "timeout": 0.5})
    assert reply.status_code == 504 and reply.json()["error"]["type"] == "DeadlineExceeded"
    replica = registry.load(name).pids["replica-0"]
    os.kill(replica, signal.SIGSTOP)  # unresponsive: the load balancer marks it unhealthy
    try:
        assert wait_until(lambda: httpx.get(f"{base}/health", timeout=10).status_code == 503)
        assert httpx.get(f"{base}/health").json()["status"] == "unavailable"
        reply = httpx.post(f"{base}/v1/completions", json={"model": name, "prompt": "hi"})
        assert reply.status_code == 503, reply.text
        assert reply.json()["error"]["code"] == "deployment_unavailable"
        reply = httpx.post(f"{base}/mii/{name}", json={"prompts": "hi"})
        assert reply.status_code == 503 and reply.json()["error"]["type"] == "DeploymentUnavailable"
        families = metric_families(base)
        assert sample(families, "mii_deployment_up") == 1
        assert sample(families, "mii_replica_healthy", replica="0") == 0
        assert sample(families, "mii_replicas_healthy") == 0
    finally:
        os.kill(replica, signal.SIGCONT)
    assert wait_until(lambda: httpx.get(f"{base}/health", timeout=10).status_code == 200)


def test_replica_lost_mid_stream_ends_with_an_error_event(gw):
    client, base, name = gw
    old = registry.load(name).pids["replica-0"]
    events = []
    with httpx.stream("POST", f"{base}/v1/completions", timeout=60, json={
            "model": name, "prompt": "DeepSpeed is", "max_tokens": 500, "ignore_eos": True,
            "stream": True}) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if not line:
                continue
            events.append(line)
            if len(events) == 2:
                os.kill(old, signal.SIGKILL)
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][6:])
    assert error["error"]["code"] == "deployment_unavailable", error
    assert wait_until(lambda: registry.load(name).pids["replica-0"] != old)
    assert wait_until(lambda: httpx.get(f"{base}/health", timeout=10).status_code == 200, 60)


def test_gateway_dies_with_terminate_server(tiny_model):
    client = serve(tiny_model, deployment_name="rest-stop", engine="transformers",
                   enable_restful_api=True)
    rest_port = client.mii_config.restful_api_port
    try:
        record = registry.load("rest-stop")
        gateway_pid = record.pids["rest-gateway"]
        assert registry.pid_alive(gateway_pid, "mii_core.control.gateway_main")
        # serve() returned, so the gateway already answers (on localhost: the IPv4 loopback)
        assert listening(gateway_pid) == {("127.0.0.1", rest_port)}
        assert httpx.get(f"http://127.0.0.1:{rest_port}/health").status_code == 200
    finally:
        client.terminate_server()
    assert wait_until(lambda: not registry.pid_alive(gateway_pid, "mii_core.control.gateway_main"), 10)
    assert not ours_listening(rest_port)


def test_overload_queueing_auth_and_supervisor_death(tiny_model, hooks):
    """With the replica's engine loop held: 429 when the replica's queue is full, and the
    gateway queueing requests beyond restful_processes; bearer token when auth_token is
    set; the gateway exits on its own when its supervisor is killed."""
    token = "gateway-test-token"
    client = serve(tiny_model, hooks=hooks, deployment_name="rest-busy", engine="transformers",
                   enable_restful_api=True, max_batch_size=1, max_queue_size=2,
                   auth_token=token, restful_processes=2)
    rest_port = client.mii_config.restful_api_port
    base = f"http://127.0.0.1:{rest_port}"
    try:
        auth = {"Authorization": f"Bearer {token}"}
        assert httpx.get(f"{base}/health").status_code == 200  # health needs no token
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            reply = httpx.get(f"{base}/v1/models", headers=headers)
            assert reply.status_code == 401
            assert reply.json()["error"]["type"] == "authentication_error"
            assert httpx.get(f"{base}/metrics", headers=headers).status_code == 401
        guarded = openai.OpenAI(base_url=f"{base}/v1", api_key=token, max_retries=0)
        assert guarded.completions.create(model="rest-busy", prompt="hi", max_tokens=2,
                                          temperature=0, extra_body={"ignore_eos": True}
                                          ).usage.completion_tokens == 2

        def gauges() -> tuple:
            families = metric_families_with(base, auth)
            return (sample(families, "mii_gateway_in_flight_requests"),
                    sample(families, "mii_gateway_waiting_requests"),
                    sample(families, "mii_replica_queue_depth", replica="0"))

        async def until(predicate) -> None:
            assert await asyncio.to_thread(wait_until, predicate), predicate

        async def scenario():
            async with httpx.AsyncClient(base_url=base, headers=auth, timeout=120) as http:
                def post(prompts):
                    return asyncio.ensure_future(http.post("/mii/rest-busy", json={
                        "prompts": prompts, "max_new_tokens": 3, "do_sample": False,
                        "ignore_eos": True}))

                first = post("first")
                await until(lambda: queue_depth(client) == 1)
                too_many = await http.post("/mii/rest-busy", json={"prompts": ["a", "b"]})
                second = post("second")
                await until(lambda: queue_depth(client) == 2)  # both of the gateway's slots
                third = post("third")  # waits in the gateway, not rejected
                await until(lambda: gauges() == (2, 1, 2))
                assert not (first.done() or second.done() or third.done())
                hooks.release()
                return too_many, await asyncio.gather(first, second, third)

        with hooks.held(client):
            too_many, replies = asyncio.run(scenario())
        assert too_many.status_code == 429, too_many.text
        busy = too_many.json()["error"]
        assert busy["code"] == "server_overloaded" and "queue is full" in busy["message"]
        assert [r.status_code for r in replies] == [200] * 3, [r.text for r in replies]
        assert [r.json()[0]["generated_length"] for r in replies] == [3] * 3
        families = metric_families_with(base, auth)
        assert sample(families, "mii_replica_requests", "mii_replica_requests_total",
                      replica="0", outcome="rejected") == 1
        assert gauges() == (0, 0, 0)

        record = registry.load("rest-busy")
        gateway_pid = record.pids["rest-gateway"]
        os.kill(record.supervisor_pid, signal.SIGKILL)
        assert wait_until(lambda: not registry.pid_alive(gateway_pid, "mii_core.control.gateway_main"),
                          15)
        assert wait_until(lambda: not ours_listening(rest_port), 10)
    finally:
        hooks.release()
        if registry.find_live("rest-busy") is not None:
            client.terminate_server()


def metric_families_with(base: str, headers: dict) -> dict:
    reply = httpx.get(f"{base}/metrics", headers=headers)
    assert reply.status_code == 200
    return {f.name: f for f in text_string_to_metric_families(reply.text)}
