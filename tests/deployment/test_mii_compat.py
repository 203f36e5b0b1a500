"""Code written for DeepSpeed-MII 0.3 runs unchanged (docs/mii-compatibility.md).

Each script below is written as MII's docs and tests write it — attribute paths after a
plain ``import mii``, ``streaming_fn`` callbacks reading ``response[0]``, the
``model_config``/``mii_config`` dicts, ``mii.backend.client.MIIClient(mii_config,
host=...)``, ``mii.pipeline`` — and runs in a fresh interpreter against a real deployment
of the tiny model. Every generation is greedy, so every text is fixed.
"""
from __future__ import annotations

import json
import textwrap

import pytest
from conftest import deployed, run_python

from mii_core.deploy import registry

NAME = "compat"
GREEDY = "max_new_tokens=12, do_sample=False"


def _script(body: str, **values) -> dict:
    """Run ``body`` (which prints one JSON line last) and return that line."""
    code = textwrap.dedent(body).format(**values)
    result = run_python(code, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def served(tiny_model):
    """MII's README deployment: serve by keyword, REST gateway on."""
    with deployed(tiny_model, NAME, enable_restful_api=True, restful_processes=2) as client:
        yield client


def test_attribute_paths_after_a_plain_import(served):
    out = _script('''
        import json, mii
        model = mii.config.ModelConfig(model_name_or_path="m", tensor_parallel=1)
        config = mii.config.MIIConfig(model_config=model, deployment_name="x")
        client_class = mii.backend.client.MIIClient
        print(json.dumps(dict(
            model=model.model_name_or_path, name=config.deployment_name,
            client=client_class.__name__, task=mii.constants.TaskType.TEXT_GENERATION.value,
            local=mii.constants.DeploymentType.LOCAL.value,
            response=mii.batching.data_classes.Response.__name__,
            apis=[f.__name__ for f in (mii.api.serve, mii.api.client, mii.api.pipeline)],
            device_map=mii.config.DEVICE_MAP_DEFAULT)))
    ''')
    assert out == {"model": "m", "name": "x", "client": "MIIClient", "task": "text-generation",
                   "local": "local", "response": "Response",
                   "apis": ["serve", "client", "pipeline"], "device_map": "auto"}


def test_client_by_name_streaming_callback_and_backend_client(served):
    expected = served(["DeepSpeed is", "Seattle is"], max_new_tokens=12, do_sample=False)
    out = _script('''
        import json, mii
        from mii.backend.client import MIIClient

        client = mii.client("{name}")
        response = client.generate(["DeepSpeed is", "Seattle is"], {greedy})
        texts = [r.generated_text for r in response]

        chunks = []
        def callback(response):  # MII passes a list of Response
            chunks.append(response[0].generated_text)
        client.generate("DeepSpeed is", streaming_fn=callback, {greedy})

        config = mii.config.get_mii_config("{name}")
        direct = MIIClient(config, host="localhost")(["Seattle is"], {greedy})
        print(json.dumps(dict(texts=texts, streamed="".join(chunks),
                              direct=direct[0].generated_text, lengths=[r.generated_length for r in response],
                              reasons=[str(r.finish_reason) for r in response],
                              port=config.port_number)))
    ''', name=NAME, greedy=GREEDY)
    texts = [r.generated_text for r in expected]
    assert out["texts"] == texts and out["streamed"] == texts[0] and out["direct"] == texts[1]
    assert out["lengths"] == [r.generated_length for r in expected]
    assert all(reason in ("length", "stop") for reason in out["reasons"])
    assert out["port"] == served.port


def test_the_rest_gateway_in_mii_s_style(served):
    record = registry.load(NAME)
    port = record.mii_config.restful_api_port
    expected = served("DeepSpeed is", max_new_tokens=12, do_sample=False)[0].generated_text
    out = _script('''
        import json, urllib.request
        body = json.dumps({{"prompts": ["DeepSpeed is"], "max_new_tokens": 12, "do_sample": False}})
        request = urllib.request.Request("http://localhost:{port}/mii/{name}", data=body.encode(),
                                         headers={{"Content-Type": "application/json"}})
        with urllib.request.urlopen(request, timeout=60) as reply:
            result = json.loads(reply.read())
        with urllib.request.urlopen("http://localhost:{port}/healthz", timeout=10) as reply:
            health = reply.read().decode()
        print(json.dumps(dict(text=result[0]["generated_text"], health=health)))
    ''', port=port, name=NAME)
    assert out == {"text": expected, "health": "ok"}


def test_serve_with_config_dicts_then_terminate_from_another_process(tiny_model, served):
    """MII's dict style; generate_replica_configs() placement; terminate by name elsewhere."""
    from mii_core.deploy.ports import free_port, is_port_free

    port = free_port()  # MII's rule puts the replicas on the next ports: those must be free
    while not (is_port_free(port + 1) and is_port_free(port + 2)):
        port = free_port()
    out = _script('''
        import json, mii
        mii_config = mii.config.MIIConfig(model_config={{"model_name_or_path": "{model}",
                                                        "replica_num": 2}},
                                          port_number={port}, deployment_name="compat-dicts")
        mii_config.generate_replica_configs()
        replicas = [dict(host=r.hostname, ports=r.tensor_parallel_ports, dist=r.torch_dist_port)
                    for r in mii_config.model_conf.replica_configs]
        client = mii.serve(model_config={{"model_name_or_path": "{model}", "replica_num": 2}},
                           mii_config={{"deployment_name": "compat-dicts", "port_number": {port}}})
        served = sorted(client(["DeepSpeed is"], {greedy})[0].replica for _ in range(2))
        print(json.dumps(dict(replicas=replicas, served=served)))
    ''', model=tiny_model, port=port, greedy=GREEDY)
    try:
        assert out["replicas"] == [dict(host="localhost", ports=[port + 1], dist=29500),
                                   dict(host="localhost", ports=[port + 2], dist=29600)]
        assert out["served"] == [0, 1]  # round robin over the two replicas
        done = _script('''
            import json, mii
            mii.client("compat-dicts").terminate_server()
            print(json.dumps(dict(ok=True)))
        ''')
        assert done == {"ok": True} and registry.load("compat-dicts") is None
    finally:
        from conftest import kill_deployment

        kill_deployment("compat-dicts")


def test_pipeline_gives_the_served_greedy_text(tiny_model, served):
    expected = [r.generated_text
                for r in served(["DeepSpeed is", "Seattle is"], max_new_tokens=12,
                                do_sample=False)]
    out = _script('''
        import json, mii
        pipe = mii.pipeline("{model}")
        response = pipe(["DeepSpeed is", "Seattle is"], {greedy})
        texts = [r.generated_text for r in response]
        pipe.destroy()
        try:
            pipe("DeepSpeed is")
            after = "no error"
        except Exception as error:
            after = type(error).__name__
        try:
            mii.pipeline("{model}", port_number=1)  # a server field: not a pipeline's
            unknown = "no error"
        except ValueError as error:
            unknown = str(error)
        print(json.dumps(dict(texts=texts, after=after, unknown=unknown)))
    ''', model=tiny_model, greedy=GREEDY)
    assert out["texts"] == expected
    assert out["after"] == "DeploymentUnavailable"
    assert "port_number" in out["unknown"] and "ModelConfig field" in out["unknown"]


def test_generate_replica_configs_refuses_a_map_that_does_not_fit():
    import mii

    config = mii.config.MIIConfig(model_config={"model_name_or_path": "m", "replica_num": 2,
                                                "device_map": {"localhost": [[0], [0]]}})
    with pytest.raises(ValueError):
        config.generate_replica_configs()
    assert config.model_conf.replica_configs == []
    given = mii.config.MIIConfig(model_config={
        "model_name_or_path": "m", "replica_configs": [{"hostname": "h", "gpu_indices": [3]}]})
    given.generate_replica_configs()  # given ones stay
    assert given.model_conf.replica_configs[0].gpu_indices == [3]


def test_mii_configuration_fields_load():
    """An MII config dump carries version, instance_type and the ZMQ ports."""
    import mii

    config = mii.config.MIIConfig(
        model_config={"model_name_or_path": "m", "zmq_port_number": 25600},
        version=1, instance_type="Standard_NC12s_v3")
    assert config.model_conf.zmq_port_number == 25600 and config.version == 1
    assert mii.config.ReplicaConfig(zmq_port=25555).zmq_port == 25555
