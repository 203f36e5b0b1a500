"""``mii bench``: argument parsing, the statistics, prompts, the report, and a whole run
against an in-process fake client (errors counted, never fatal). No deployment, no
timing asserted."""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
from typing import Any, AsyncIterator, Dict, List

import pytest

from mii_core import bench_cli
from mii_core.api.response import Response
from mii_core.bench_cli import (
    BenchRun,
    BenchSettings,
    Calibration,
    RequestResult,
    TokenRange,
    build_report,
    error_kind,
    percentile,
    report_text,
    request_spec,
    summary,
    token_gaps,
    token_range,
)
from mii_core.cli import build_parser
from mii_core.errors import DeadlineExceeded, ServerOverloaded


# -- arguments -----------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("128", TokenRange(128, 128)), ("64-1024", TokenRange(64, 1024)),
    ("8-8", TokenRange(8, 8)), (" 64 - 1024 ", TokenRange(64, 1024)), ("1", TokenRange(1, 1)),
])
def test_token_range_parses_a_count_or_a_range(text, expected):
    assert token_range(text) == expected


@pytest.mark.parametrize("text, message", [
    ("1024-64", "range '1024-64' has LOW 1024 above HIGH 64"),
    ("0", "token counts start at 1, got '0'"),
    ("0-5", "token counts start at 1, got '0-5'"),
    ("abc", "expected a token count N or a range LOW-HIGH of whole numbers, got 'abc'"),
    ("64-", "got '64-'"), ("-64", "got '-64'"), ("1.5", "got '1.5'"), ("", "got ''"),
    ("\u00b2", "got '\u00b2'"), ("1-2-3", "got '1-2-3'"),
])
def test_token_range_refuses_anything_else(text, message):
    with pytest.raises(argparse.ArgumentTypeError) as caught:
        token_range(text)
    assert message in str(caught.value)


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["bench", "demo", *argv])


def parse_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as caught:
        parse(*argv)
    assert caught.value.code == 2
    return capsys.readouterr().err


def test_bench_options_and_their_defaults():
    settings = BenchSettings.from_args(parse())
    assert settings == BenchSettings(concurrency=1, requests=bench_cli.DEFAULT_REQUESTS,
                                     duration_s=None, prompt_tokens=TokenRange(128, 128),
                                     new_tokens=TokenRange(128, 128))
    args = parse("--concurrency", "4", "--duration", "2.5", "--prompt-tokens", "64-1024",
                 "--new-tokens", "16", "--seed", "7", "--sample", "--stream", "--timeout", "30",
                 "--json-out", "out.json")
    assert BenchSettings.from_args(args) == BenchSettings(
        concurrency=4, requests=None, duration_s=2.5, prompt_tokens=TokenRange(64, 1024),
        new_tokens=TokenRange(16, 16), seed=7, sample=True, stream=True, timeout_s=30.0)
    assert args.json_out == "out.json"
    assert BenchSettings.from_args(parse("--requests", "8")).requests == 8


@pytest.mark.parametrize("argv, message", [
    (["--prompt-tokens", "1024-64"],
     "argument --prompt-tokens: range '1024-64' has LOW 1024 above HIGH 64"),
    (["--new-tokens", "x"], "argument --new-tokens: expected a token count N or a range"),
    (["--concurrency", "0"], "argument --concurrency: expected a whole number >= 1, got '0'"),
    (["--requests", "-3"], "argument --requests: expected a whole number >= 1, got '-3'"),
    (["--duration", "0"], "argument --duration: expected a number of seconds > 0, got '0'"),
    (["--duration", "nan"], "argument --duration: expected a number of seconds > 0"),
    (["--timeout", "soon"], "argument --timeout: expected a number of seconds > 0"),
    (["--requests", "3", "--duration", "1"],
     "argument --duration: not allowed with argument --requests"),
])
def test_bad_bench_options_are_refused_naming_the_option(capsys, argv, message):
    assert message in parse_error(capsys, *argv)


def test_status_takes_json():
    assert build_parser().parse_args(["status", "demo", "--json"]).json is True
    assert build_parser().parse_args(["status", "demo"]).json is False


# -- statistics ----------------------------------------------------------------------------
def test_percentile_interpolates_between_order_statistics():
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5  # numpy's "linear"
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.9) == pytest.approx(3.7)
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.0) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 1.0) == 4.0
    values = list(range(101))
    assert [percentile(values, q) for q in (0.5, 0.9, 0.99)] == [50, 90, 99]


def test_percentiles_are_ordered_whatever_the_values():
    rng = random.Random(3)
    for _ in range(50):
        values = [rng.expovariate(1.0) for _ in range(rng.randint(1, 30))]
        stats = summary(values)
        assert stats["min"] <= stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]


@pytest.mark.parametrize("q", [-0.01, 1.01])
def test_percentile_outside_zero_one_is_refused(q):
    with pytest.raises(ValueError, match="quantile must be within"):
        percentile([1.0], q)


def test_summary():
    assert summary([]) is None
    assert summary([1.0, 2.0, 3.0, 4.0]) == {"count": 4, "mean": 2.5, "min": 1.0, "p50": 2.5,
                                             "p90": pytest.approx(3.7),
                                             "p99": pytest.approx(3.97), "max": 4.0}


def test_token_gaps_spread_a_chunk_over_its_tokens():
    # (arrival, tokens so far): the first chunk is the first token (its wait is TTFT).
    assert token_gaps([(1.0, 1), (1.5, 2), (2.5, 4)]) == [0.5, 0.5, 0.5]
    assert token_gaps([(1.0, 1)]) == []
    assert token_gaps([]) == []


def test_token_gaps_skip_chunks_without_tokens_and_tokens_of_the_first_chunk():
    assert token_gaps([(1.0, 0), (2.0, 2), (2.5, 2), (3.0, 3)]) == [1.0]


# -- prompts and requests ------------------------------------------------------------------
def test_calibration_sizes_prompts_by_the_fitted_line():
    calibration = Calibration(overhead=2.0, per_word=2.0, probes=2)
    assert calibration.words_for(12) == 5
    assert calibration.words_for(1) == 1  # at least one word
    assert Calibration().words_for(40) == 40  # uncalibrated: one word a token


def test_request_spec_depends_only_on_seed_and_index():
    settings = BenchSettings(concurrency=2, requests=10, duration_s=None,
                             prompt_tokens=TokenRange(8, 16), new_tokens=TokenRange(2, 6),
                             seed=5)
    calibration = Calibration(overhead=1.0, per_word=1.0)
    specs = [request_spec(settings, calibration, i) for i in range(10)]
    assert request_spec(settings, calibration, 7) == specs[7]  # same whatever came before
    assert len({s.prompt for s in specs}) == 10  # distinct: no prefix-cache shortcut
    for spec in specs:
        assert 8 <= spec.prompt_tokens <= 16 and 2 <= spec.new_tokens <= 6
        assert len(spec.prompt.split()) == calibration.words_for(spec.prompt_tokens)
        assert set(spec.prompt.split()) <= set(bench_cli.WORDS)
    other = BenchSettings(**{**settings.__dict__, "seed": 6})
    assert request_spec(other, calibration, 7) != specs[7]


def test_generate_kwargs_are_exact_length_and_greedy_unless_sampled():
    settings = BenchSettings(1, 1, None, TokenRange(1, 1), TokenRange(1, 1))
    assert bench_cli.generate_kwargs(settings, 9) == {"max_new_tokens": 9, "ignore_eos": True,
                                                      "do_sample": False}
    sampled = BenchSettings(1, 1, None, TokenRange(1, 1), TokenRange(1, 1), sample=True)
    assert bench_cli.generate_kwargs(sampled, 9)["do_sample"] is True
    # each sampled request gets its own seed, fixed by --seed and its index
    seeds = {bench_cli.generate_kwargs(sampled, 9, index)["seed"] for index in range(4)}
    assert len(seeds) == 4
    assert bench_cli.generate_kwargs(sampled, 9, 2) == bench_cli.generate_kwargs(sampled, 9, 2)
    other = BenchSettings(1, 1, None, TokenRange(1, 1), TokenRange(1, 1), sample=True, seed=5)
    assert bench_cli.generate_kwargs(other, 9, 2)["seed"] != \
        bench_cli.generate_kwargs(sampled, 9, 2)["seed"]


def test_error_kind_names_the_class_and_a_status_code():
    class Code:
        name = "UNAVAILABLE"

    class RpcLike(Exception):
        def code(self):
            return Code()

    assert error_kind(ServerOverloaded("full")) == "ServerOverloaded"
    assert error_kind(RpcLike()) == "RpcLike(UNAVAILABLE)"


# -- the report ----------------------------------------------------------------------------
def finished_run(stream: bool) -> BenchRun:
    settings = BenchSettings(concurrency=2, requests=4, duration_s=None,
                             prompt_tokens=TokenRange(10, 10), new_tokens=TokenRange(3, 3),
                             stream=stream)
    run = BenchRun(settings, Calibration(1.0, 1.0, 2), start=100.0, end=1.0, started=4)
    for index, replica in enumerate((0, 1, 0)):
        run.results.append(RequestResult(
            index, started=0.1 * index, finished=0.1 * index + 0.5, target_prompt_tokens=10,
            prompt_tokens=11, generated_tokens=3, replica=replica,
            ttft=0.1 if stream else None, replica_ttft=0.05,
            gaps=[0.02, 0.04] if stream else []))
    run.results.append(RequestResult(3, started=0.3, finished=0.4, target_prompt_tokens=10,
                                     error="DeadlineExceeded", message="Deadline Exceeded"))
    return run


def test_report_counts_requests_tokens_errors_and_throughput():
    report = build_report(finished_run(stream=True), "demo")
    assert report["requests"] == {"started": 4, "finished": 4, "ok": 3, "failed": 1}
    assert report["errors"] == {"DeadlineExceeded": {"count": 1, "example": "Deadline Exceeded"}}
    assert report["tokens"] == {"prompt_total": 33, "generated_total": 9, "prompt_mean": 11.0,
                                "generated_mean": 3.0, "prompt_target_mean": 10.0}
    assert report["throughput"] == {"requests_per_s": 3.0, "generated_tokens_per_s": 9.0,
                                    "total_tokens_per_s": 42.0}
    assert report["latency_s"]["request"]["count"] == 3  # failed requests left out
    assert report["latency_s"]["ttft"]["p50"] == pytest.approx(0.1)
    assert report["latency_s"]["inter_token"]["count"] == 6
    assert report["replicas"] == {"0": 2, "1": 1}
    assert report["parameters"]["prompt_tokens"] == "10" and report["ttft_note"] is None
    json.dumps(report)  # what --json-out writes
    text = report_text(report)
    assert text.splitlines()[0] == ("mii bench demo: 4 requests (3 ok, 1 failed) in 1.00 s, "
                                    "concurrency 2, streaming, greedy")
    assert "throughput        3.00 requests/s, 9.00 generated tok/s, 42.00 total tok/s" in text
    assert "DeadlineExceeded x1 (e.g. 'Deadline Exceeded')" in text
    assert "served by replica  0: 2  1: 1" in text


def test_report_without_streaming_says_ttft_needs_it():
    report = build_report(finished_run(stream=False), "demo")
    assert report["latency_s"]["ttft"] is None and report["latency_s"]["inter_token"] is None
    assert report["latency_s"]["replica_ttft"]["count"] == 3
    assert "need --stream" in report["ttft_note"]
    text = report_text(report)
    assert "need --stream" in text and "TTFT at replica" in text
    assert [line for line in text.splitlines() if line.split("  ")[0] == "TTFT"] == []


# -- a whole run against a fake client -----------------------------------------------------
class FakeClient:
    """Answers like MIIClient: prompt_length = words + 1 (a BOS), exactly max_new_tokens
    generated; every fifth bench request (by prompt) fails with ServerOverloaded."""

    deployment_name = "fake"

    def __init__(self) -> None:
        self.calls: List[Dict[str, Any]] = []

    def _answer(self, prompt: str, kwargs: Dict[str, Any]) -> Response:
        self.calls.append(dict(kwargs, prompt=prompt))
        if len(self.calls) > 2 and len(self.calls) % 5 == 0:  # after the two probes
            raise ServerOverloaded("the queue is full")
        return Response("x" * kwargs["max_new_tokens"], len(prompt.split()) + 1,
                        kwargs["max_new_tokens"], "length", replica=len(self.calls) % 2,
                        time_to_first_token_s=0.01)

    async def agenerate(self, prompt: str, timeout=None, **kwargs: Any) -> List[Response]:
        await asyncio.sleep(0)
        return [self._answer(prompt, kwargs)]

    async def astream(self, prompt: str, timeout=None, **kwargs: Any) -> AsyncIterator[Response]:
        final = self._answer(prompt, kwargs)
        for count in range(1, final.generated_length + 1):
            await asyncio.sleep(0)
            yield Response("x", final.prompt_length, count,
                           "length" if count == final.generated_length else "none",
                           replica=final.replica, time_to_first_token_s=0.01)


@pytest.mark.parametrize("stream", [False, True])
def test_a_run_counts_errors_and_keeps_going(tmp_path, stream):
    client = FakeClient()
    argv = ["--requests", "12", "--concurrency", "3", "--prompt-tokens", "8-16",
            "--new-tokens", "4", "--json-out", str(tmp_path / "bench.json")]
    out, err = io.StringIO(), io.StringIO()
    code = bench_cli.main(parse(*argv, *(["--stream"] if stream else [])), client, out, err)
    assert code == 1  # some requests failed: the report is still complete
    report = json.loads((tmp_path / "bench.json").read_text())
    failed = sum(1 for i in range(3, 15) if i % 5 == 0)  # calls 3..14 are the bench's
    assert report["requests"] == {"started": 12, "finished": 12, "ok": 12 - failed,
                                  "failed": failed}
    assert report["errors"] == {"ServerOverloaded": {"count": failed,
                                                     "example": "the queue is full"}}
    assert report["tokens"]["generated_total"] == 4 * (12 - failed)
    # The probes fit prompt_length = words + 1 exactly, so the prompts hit their targets.
    assert report["calibration"] == {"overhead": 1.0, "per_word": 1.0, "probes": 2, "note": ""}
    settings = BenchSettings.from_args(parse(*argv))
    specs = [request_spec(settings, Calibration(1.0, 1.0), i) for i in range(12)]
    assert sorted(c["prompt"] for c in client.calls[2:]) == sorted(s.prompt for s in specs)
    assert all(len(s.prompt.split()) + 1 == s.prompt_tokens for s in specs)
    assert all(c["ignore_eos"] and c["do_sample"] is False for c in client.calls[2:])
    assert (report["latency_s"]["inter_token"] is not None) == stream
    assert "requests failed (see errors)" in err.getvalue()
    assert out.getvalue().startswith("mii bench fake: 12 requests")


def test_a_failing_probe_falls_back_to_a_word_a_token():
    class Failing(FakeClient):
        async def agenerate(self, prompt, timeout=None, **kwargs):
            raise DeadlineExceeded("too slow")

    run = BenchRun(BenchSettings(1, 1, None, TokenRange(5, 5), TokenRange(1, 1)))
    asyncio.run(bench_cli.run_bench(Failing(), run, None))
    assert run.calibration.per_word == 1.0 and run.calibration.probes == 1
    assert "probe failed (DeadlineExceeded: too slow)" in run.calibration.note
    assert [r.error for r in run.results] == ["DeadlineExceeded"]


def test_an_unwritable_json_out_fails_before_any_request(tmp_path):
    client = FakeClient()
    err = io.StringIO()
    path = tmp_path / "missing" / "bench.json"
    assert bench_cli.main(parse("--json-out", str(path)), client, io.StringIO(), err) == 2
    assert f"mii bench: --json-out {path}: No such file or directory" in err.getvalue()
    assert client.calls == []
