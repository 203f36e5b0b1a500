"""A 30-second soak in CI: 32 clients mixing unary, streaming and abandoned requests."""
from bench.soak import soak


def test_soak_loses_nothing(tiny_model):
    report = soak(tiny_model, clients=32, seconds=30, replicas=2)
    assert report["requests"] > 100, report
    assert report["lost"] == 0 and report["errors"] == 0, str(report)
    assert report["ok"] + report["cancelled"] == report["requests"]
    assert report["server_cancelled"] >= report["cancelled"] * 0.9, str(report)  # slots freed
