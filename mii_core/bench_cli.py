"""``mii bench NAME``: a load generator that is a client of a running deployment like any
other (``MIIClient.agenerate`` / ``astream`` on one asyncio loop, ``--concurrency``
requests in flight), and the statistics of what it measured.

Prompts are text, so the bench needs no tokenizer: each is a run of common English
words drawn by an RNG seeded with ``--seed`` and the request's index (the same
command sends the same prompts whatever the timing; distinct prompts, so a prefix
cache does not turn the bench into a cache benchmark). Words are not tokens, so before
timing anything two probe requests (8 and 40 words, one new token) measure how many
tokens the deployment's own tokenizer makes of a word here (``prompt_length`` of their
Responses): ``tokens = overhead + per_word * words``. Prompts are then sized by that
line; the count is still approximate (words differ), and the report gives the real
mean from ``Response.prompt_length``. ``ignore_eos=True`` makes every request generate
exactly its ``--new-tokens`` (unless the served context ends first; again the report
counts what came back).

The pure pieces (ranges, percentiles, per-token gaps, the report) are functions of
plain data, unit-tested without a deployment.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Tuple

from mii_core.api.client import MIIClient
from mii_core.cli_format import seconds, table

DEFAULT_REQUESTS = 100
_WHOLE = re.compile(r"[0-9]+")  # ASCII digits only: str.isdigit() accepts '²', int() does not
PROGRESS_EVERY_S = 1.0
PROBE_WORDS = (8, 40)  # short enough for any served context, far enough apart for a slope
QUANTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99))
WORDS = tuple("""
the of and to in is was for on that with as by at from it his an were are which this be
or has had not but first one their its new after who they have her she two been other
when there all during into school time may years more most only over city some world
would where later up such used many can state about national out known university
united then made year water day house small long river light ship road book market
morning people number part music place sea weather science machine garden window street
""".split())


# -- arguments -----------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenRange:
    """A token count drawn uniformly from ``low..high`` (inclusive; equal for a fixed one)."""

    low: int
    high: int

    def draw(self, rng: random.Random) -> int:
        """One count from the range."""
        return rng.randint(self.low, self.high)

    def mean(self) -> float:
        """The mean of the uniform draw."""
        return (self.low + self.high) / 2

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


def token_range(text: str) -> TokenRange:
    """``128`` or ``64-1024`` -> TokenRange (an argparse ``type``: argparse names the option
    in front of the message of the ArgumentTypeError raised for anything else)."""
    low_text, dash, high_text = (part.strip() for part in text.partition("-"))
    if not dash:
        high_text = low_text
    if not (_WHOLE.fullmatch(low_text) and _WHOLE.fullmatch(high_text)):
        raise argparse.ArgumentTypeError(
            f"expected a token count N or a range LOW-HIGH of whole numbers, got {text!r}")
    low, high = int(low_text), int(high_text)
    if low < 1:
        raise argparse.ArgumentTypeError(f"token counts start at 1, got {text!r}")
    if low > high:
        raise argparse.ArgumentTypeError(f"range {text!r} has LOW {low} above HIGH {high}")
    return TokenRange(low, high)


def positive_int(text: str) -> int:
    """A whole number >= 1 (argparse ``type``)."""
    if not _WHOLE.fullmatch(text.strip()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def positive_seconds(text: str) -> float:
    """A finite number of seconds > 0 (argparse ``type``)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def add_parser(subparsers: Any, func: Callable[[argparse.Namespace], int]) -> None:
    """Register ``mii bench`` on the CLI's sub-command parsers."""
    p = subparsers.add_parser(
        "bench", help="load-test a running deployment",
        description="Send generate requests to a running deployment and report throughput "
                    "and latency percentiles. Prompts are seeded random words sized to "
                    "--prompt-tokens through two probe requests (see the report for the "
                    "real prompt length); ignore_eos=True makes --new-tokens exact.")
    p.add_argument("name", help="deployment name, model name/path or HOST:PORT")
    p.add_argument("--concurrency", type=positive_int, default=1, metavar="C",
                   help="requests in flight at once (default 1)")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--requests", type=positive_int, default=None, metavar="N",
                        help=f"send N requests (default {DEFAULT_REQUESTS})")
    amount.add_argument("--duration", type=positive_seconds, default=None, metavar="S",
                        help="start requests for S seconds (those in flight then finish)")
    p.add_argument("--prompt-tokens", type=token_range, default=TokenRange(128, 128),
                   metavar="N|LOW-HIGH", help="prompt length in tokens, approximate "
                   "(default 128)")
    p.add_argument("--new-tokens", type=token_range, default=TokenRange(128, 128),
                   metavar="N|LOW-HIGH", help="tokens to generate per request (default 128)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of prompts, lengths and (with --sample) each request's sampling "
                        "seed (default 0)")
    p.add_argument("--sample", action="store_true",
                   help="do_sample=True with the default top_p etc. (default: greedy)")
    p.add_argument("--stream", action="store_true",
                   help="stream the responses: measures time to first token and "
                        "inter-token latency at the client")
    p.add_argument("--timeout", type=positive_seconds, default=None, metavar="S",
                   help="deadline of each request (default none); a miss counts as an error")
    p.add_argument("--json-out", default=None, metavar="PATH",
                   help="also write the report, with the parameters, as JSON")
    p.set_defaults(func=func)


@dataclass(frozen=True)
class BenchSettings:
    """What one bench run does (from the command line)."""

    concurrency: int
    requests: Optional[int]  # exactly one of requests / duration_s is set
    duration_s: Optional[float]
    prompt_tokens: TokenRange
    new_tokens: TokenRange
    seed: int = 0
    sample: bool = False
    stream: bool = False
    timeout_s: Optional[float] = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BenchSettings":
        # --requests and --duration exclude each other; with neither, DEFAULT_REQUESTS.
        requests = None if args.duration is not None else (args.requests or DEFAULT_REQUESTS)
        return cls(concurrency=args.concurrency, requests=requests,
                   duration_s=args.duration, prompt_tokens=args.prompt_tokens,
                   new_tokens=args.new_tokens, seed=args.seed, sample=args.sample,
                   stream=args.stream, timeout_s=args.timeout)

    def parameters(self) -> Dict[str, Any]:
        """JSON-able form, for the report."""
        return {"concurrency": self.concurrency, "requests": self.requests,
                "duration_s": self.duration_s, "prompt_tokens": str(self.prompt_tokens),
                "new_tokens": str(self.new_tokens), "seed": self.seed,
                "sample": self.sample, "stream": self.stream, "timeout_s": self.timeout_s}


# -- statistics ----------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """The ``q`` quantile (0 <= q <= 1) of ``values``, linearly interpolated between the
    two nearest order statistics (numpy's default, "linear"); None for no values. It is
    non-decreasing in ``q``, so p50 <= p90 <= p99 always holds."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be within [0, 1], got {q}")
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    value = ordered[below] + (ordered[above] - ordered[below]) * (position - below)
    return min(value, ordered[above])  # rounding must not put it past the next statistic


def summary(values: Sequence[float]) -> Optional[Dict[str, float]]:
    """count, mean, min, p50, p90, p99, max of ``values``; None for no values."""
    if not values:
        return None
    result: Dict[str, float] = {"count": len(values), "mean": sum(values) / len(values),
                                "min": min(values)}
    ordered = sorted(values)
    for name, q in QUANTILES:
        result[name] = percentile(ordered, q) or 0.0  # never None: values is not empty
    result["max"] = ordered[-1]
    return result


def token_gaps(arrivals: Sequence[Tuple[float, int]]) -> List[float]:
    """Inter-token latencies of one stream from its chunks' ``(arrival time, tokens so
    far)``: a chunk that brings k new tokens after a gap g counts as k gaps of g / k (a
    chunk may carry several tokens when the replica emits them together, e.g. held back
    for a stop string or an incomplete character). The first chunk's wait is the time to
    first token, not a gap, and tokens that arrive together in the first chunk give no gap
    at all (nothing is known of their spacing); chunks bringing no token are skipped."""
    gaps: List[float] = []
    last_time, last_count = None, 0
    for arrived, count in arrivals:
        new = count - last_count
        if new <= 0:
            continue
        if last_time is not None:
            gaps.extend([(arrived - last_time) / new] * new)
        last_time, last_count = arrived, count
    return gaps


# -- prompts -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    """How many prompt tokens the deployment makes of ``words`` words: overhead (BOS,
    special tokens) + per_word * words, fitted on two probe prompts."""

    overhead: float = 0.0
    per_word: float = 1.0
    probes: int = 0  # requests sent to measure it
    note: str = ""

    def words_for(self, tokens: int) -> int:
        """Words whose prompt is about ``tokens`` tokens (at least one word)."""
        return max(1, round((tokens - self.overhead) / self.per_word))


def words(rng: random.Random, count: int) -> str:
    """``count`` words drawn from WORDS."""
    return " ".join(rng.choice(WORDS) for _ in range(count))


@dataclass(frozen=True)
class RequestSpec:
    """One request of the bench (the same for a seed and index, whatever the timing)."""

    index: int
    prompt: str
    prompt_tokens: int  # the target; the real count comes back in the Response
    new_tokens: int


def request_spec(settings: BenchSettings, calibration: Calibration, index: int) -> RequestSpec:
    """Request ``index``: its own RNG (seed and index), so concurrency does not change it."""
    rng = random.Random(f"mii-bench:{settings.seed}:{index}")
    prompt_tokens = settings.prompt_tokens.draw(rng)
    new_tokens = settings.new_tokens.draw(rng)
    return RequestSpec(index, words(rng, calibration.words_for(prompt_tokens)), prompt_tokens,
                       new_tokens)


def generate_kwargs(settings: BenchSettings, new_tokens: int, index: int = 0) -> Dict[str, Any]:
    """Generate parameters of request ``index``: exact length, greedy unless --sample
    (then the deployment's defaults for top_p etc., and a seed from --seed and the index,
    so that a sampled bench draws the same tokens when it is run again)."""
    kwargs: Dict[str, Any] = {"max_new_tokens": new_tokens, "ignore_eos": True,
                              "do_sample": settings.sample}
    if settings.sample:
        kwargs["seed"] = (settings.seed * 1_000_003 + index) % 2 ** 63  # seed's bounds
    return kwargs


def error_kind(error: BaseException) -> str:
    """How errors are counted: the exception class, with the gRPC status code when the
    error carries one (mii's client raises typed mii errors, which already name it)."""
    code = getattr(error, "code", None)
    if callable(code):
        try:
            return f"{type(error).__name__}({code().name})"
        except Exception:  # noqa: BLE001 - a code() that fails: the class is still a kind
            pass
    return type(error).__name__


async def calibrate(client: MIIClient, settings: BenchSettings) -> Calibration:
    """Fit words -> tokens on two probe prompts of PROBE_WORDS words (one new token each).
    If a probe fails, one word a token is assumed and the note says why."""
    rng = random.Random(f"mii-bench-calibration:{settings.seed}")
    lengths = []
    try:
        for count in PROBE_WORDS:
            reply = await client.agenerate(words(rng, count), timeout=settings.timeout_s,
                                           max_new_tokens=1, do_sample=False)
            lengths.append(reply[0].prompt_length)
    except Exception as error:  # noqa: BLE001 - the bench measures errors, it does not die
        return Calibration(probes=len(lengths) + 1,
                           note=f"probe failed ({error_kind(error)}: {error}); assumed one "
                                "token a word")
    (short, long_), (short_words, long_words) = lengths, PROBE_WORDS
    per_word = (long_ - short) / (long_words - short_words)
    if per_word <= 0:
        return Calibration(probes=2, note=f"probes gave {lengths} tokens for {PROBE_WORDS} "
                                          "words; assumed one token a word")
    return Calibration(overhead=short - per_word * short_words, per_word=per_word, probes=2)


# -- running -------------------------------------------------------------------------------
@dataclass
class RequestResult:
    """What one request gave (times: seconds since the bench started)."""

    index: int
    started: float
    finished: float = 0.0
    error: Optional[str] = None  # error_kind(...), None when it succeeded
    message: str = ""
    target_prompt_tokens: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    replica: Optional[int] = None
    ttft: Optional[float] = None  # at the client, streaming only
    replica_ttft: Optional[float] = None  # measured by the replica (Response)
    gaps: List[float] = field(default_factory=list)  # inter-token latencies, streaming only

    @property
    def latency(self) -> float:
        return self.finished - self.started


@dataclass
class BenchRun:
    """A run in progress: what finished so far (read by the progress line and the report,
    also after an interrupt)."""

    settings: BenchSettings
    calibration: Calibration = field(default_factory=Calibration)
    results: List[RequestResult] = field(default_factory=list)
    start: float = 0.0  # perf_counter at the first request (after calibration)
    end: float = 0.0  # seconds from start to the end of the last request
    tokens_seen: int = 0  # generated tokens received so far, failed requests included
    started: int = 0

    def now(self) -> float:
        return time.perf_counter() - self.start


async def _one(client: MIIClient, run: BenchRun, spec: RequestSpec) -> RequestResult:
    settings = run.settings
    result = RequestResult(spec.index, run.now(), target_prompt_tokens=spec.prompt_tokens)
    kwargs = generate_kwargs(settings, spec.new_tokens, spec.index)
    try:
        if settings.stream:
            arrivals: List[Tuple[float, int]] = []
            final, seen = None, 0
            async for chunk in client.astream(spec.prompt, timeout=settings.timeout_s, **kwargs):
                arrivals.append((run.now(), chunk.generated_length))
                run.tokens_seen += max(0, chunk.generated_length - seen)  # cumulative counts
                seen = max(seen, chunk.generated_length)
                if chunk.finish_reason not in ("", "none"):
                    final = chunk
            if final is None:
                raise RuntimeError("the stream ended without a final chunk")
            firsts = [t for t, count in arrivals if count > 0]
            result.ttft = firsts[0] - result.started if firsts else None
            result.gaps = token_gaps(arrivals)
        else:
            final = (await client.agenerate(spec.prompt, timeout=settings.timeout_s,
                                            **kwargs))[0]
            run.tokens_seen += final.generated_length
        result.prompt_tokens, result.generated_tokens = final.prompt_length, \
            final.generated_length
        result.replica, result.replica_ttft = final.replica, final.time_to_first_token_s
    except Exception as error:  # noqa: BLE001 - errors are counted by kind, never fatal
        result.error, result.message = error_kind(error), str(error)
    result.finished = run.now()
    return result


async def _worker(client: MIIClient, run: BenchRun) -> None:
    settings = run.settings
    while True:
        if settings.requests is not None and run.started >= settings.requests:
            return
        if settings.duration_s is not None and run.now() >= settings.duration_s:
            return
        index = run.started  # no await between the check and here: indices are unique
        run.started += 1
        run.results.append(await _one(client, run, request_spec(settings, run.calibration,
                                                                index)))


def progress_line(run: BenchRun) -> str:
    """One line of progress (stderr, every PROGRESS_EVERY_S): done/total, errors, rate.
    The rate counts every generated token received so far over the time since the
    first request."""
    settings, elapsed = run.settings, max(run.now(), 1e-9)
    done = len(run.results)
    failed = sum(1 for r in run.results if r.error)
    if settings.requests is not None:
        amount, clock = f"{done}/{settings.requests} done", f"{elapsed:.1f} s"
    else:
        amount, clock = f"{done} done", f"{elapsed:.1f}/{settings.duration_s:g} s"
    return (f"[bench] {amount}, {failed} errors, {run.tokens_seen / elapsed:.1f} generated "
            f"tok/s, {clock}")


async def _progress(run: BenchRun, out: TextIO) -> None:
    while True:
        await asyncio.sleep(PROGRESS_EVERY_S)
        print(progress_line(run), file=out, flush=True)


async def run_bench(client: MIIClient, run: BenchRun, progress: Optional[TextIO]) -> None:
    """Calibrate, then keep ``concurrency`` requests in flight until the requests are
    sent (or the duration is over) and every one of them has finished; ``run`` holds
    the results as they finish."""
    run.calibration = await calibrate(client, run.settings)
    if run.calibration.note and progress is not None:
        print(f"[bench] calibration: {run.calibration.note}", file=progress, flush=True)
    run.start = time.perf_counter()
    ticker = asyncio.create_task(_progress(run, progress)) if progress is not None else None
    try:
        await asyncio.gather(*(_worker(client, run) for _ in range(run.settings.concurrency)))
    finally:
        run.end = run.now()
        if ticker is not None:
            ticker.cancel()


# -- the report ----------------------------------------------------------------------------
def build_report(run: BenchRun, deployment: str, interrupted: bool = False) -> Dict[str, Any]:
    """Everything measured, with the parameters: what ``--json-out`` writes. Throughput
    counts successful requests over the wall time from the first request's start to the
    last one's end."""
    ok = [r for r in run.results if r.error is None]
    errors: Dict[str, Dict[str, Any]] = {}
    for failed in (r for r in run.results if r.error is not None):
        entry = errors.setdefault(failed.error, {"count": 0, "example": failed.message})
        entry["count"] += 1
    elapsed = run.end
    prompt = sum(r.prompt_tokens for r in ok)
    generated = sum(r.generated_tokens for r in ok)
    per_replica: Dict[str, int] = {}
    for r in ok:
        key = str(r.replica) if r.replica is not None else "unknown"
        per_replica[key] = per_replica.get(key, 0) + 1
    stream = run.settings.stream
    return {
        "deployment": deployment,
        "parameters": run.settings.parameters(),
        "calibration": asdict(run.calibration),
        "interrupted": interrupted,
        "elapsed_s": elapsed,
        # started - finished: in flight when an interrupt cancelled them (counted nowhere else)
        "requests": {"started": run.started, "finished": len(run.results), "ok": len(ok),
                     "failed": len(run.results) - len(ok)},
        "errors": dict(sorted(errors.items())),
        "tokens": {
            "prompt_total": prompt, "generated_total": generated,
            "prompt_mean": prompt / len(ok) if ok else None,
            "generated_mean": generated / len(ok) if ok else None,
            "prompt_target_mean": (sum(r.target_prompt_tokens for r in run.results)
                                   / len(run.results) if run.results else None),
        },
        "throughput": {
            "requests_per_s": len(ok) / elapsed if elapsed > 0 else None,
            "generated_tokens_per_s": generated / elapsed if elapsed > 0 else None,
            "total_tokens_per_s": (prompt + generated) / elapsed if elapsed > 0 else None,
        },
        "latency_s": {
            "request": summary([r.latency for r in ok]),
            "ttft": summary([r.ttft for r in ok if r.ttft is not None]) if stream else None,
            "inter_token": summary([g for r in ok for g in r.gaps]) if stream else None,
            "replica_ttft": summary([r.replica_ttft for r in ok if r.replica_ttft is not None]),
        },
        "ttft_note": None if stream else (
            "TTFT and inter-token latency at the client need --stream; 'TTFT at replica' "
            "(replica_ttft) is the replica's own measure, without network and load balancer"),
        "replicas": dict(sorted(per_replica.items())),
    }


def _rate(value: Optional[float], unit: str) -> str:
    return "-" if value is None else f"{value:.2f} {unit}"


def report_text(report: Dict[str, Any]) -> str:
    """The report for people (stdout)."""
    params, requests, tokens = report["parameters"], report["requests"], report["tokens"]
    mode = ("streaming" if params["stream"] else "unary") + \
        (", sampled" if params["sample"] else ", greedy")
    head = (f"mii bench {report['deployment']}: {requests['finished']} requests "
            f"({requests['ok']} ok, {requests['failed']} failed) in "
            f"{seconds(report['elapsed_s'])}, concurrency {params['concurrency']}, {mode}")
    if report["interrupted"]:
        head += (f" (INTERRUPTED: {requests['started'] - requests['finished']} in flight "
                 "cancelled)")
    mean = tokens["prompt_mean"]
    lines = [
        head,
        f"prompt tokens     mean {'-' if mean is None else f'{mean:.1f}'} (asked "
        f"{params['prompt_tokens']}); generated tokens total {tokens['generated_total']} "
        f"(asked {params['new_tokens']} each)",
        f"throughput        {_rate(report['throughput']['requests_per_s'], 'requests/s')}, "
        f"{_rate(report['throughput']['generated_tokens_per_s'], 'generated tok/s')}, "
        f"{_rate(report['throughput']['total_tokens_per_s'], 'total tok/s')}",
    ]
    names = [("request latency", "request"), ("TTFT", "ttft"),
             ("inter-token", "inter_token"), ("TTFT at replica", "replica_ttft")]
    rows = []
    for label, key in names:
        stats = report["latency_s"][key]
        if stats is not None:
            rows.append([label] + [seconds(stats[q]) for q, _ in QUANTILES] +
                        [seconds(stats["mean"]), str(stats["count"])])
    if rows:
        lines.append(table(["latency", "p50", "p90", "p99", "mean", "samples"], rows))
    else:
        lines.append("latency           - (no request succeeded)")
    if report["ttft_note"]:
        lines.append(f"({report['ttft_note']})")
    if report["replicas"]:
        lines.append("served by replica  " + "  ".join(f"{k}: {v}" for k, v in
                                                       report["replicas"].items()))
    if report["calibration"]["note"]:
        lines.append(f"calibration       {report['calibration']['note']}")
    lines.append("errors            " + ("none" if not report["errors"] else "; ".join(
        f"{kind} x{e['count']} (e.g. {e['example'][:160]!r})"
        for kind, e in report["errors"].items())))
    return "\n".join(lines)


def main(args: argparse.Namespace, client: MIIClient, out: TextIO = sys.stdout,
         err: TextIO = sys.stderr) -> int:
    """Run the bench described by ``args`` against ``client``; print the report, write the
    JSON. Exit status: 0 when every request succeeded, 1 when any failed (the report is
    still complete), 2 when --json-out cannot be written, 130 when interrupted (Ctrl-C:
    the report covers the requests that finished)."""
    run = BenchRun(BenchSettings.from_args(args))
    try:  # opened first: a path that cannot be written fails before the bench, not after
        json_out = open(args.json_out, "w") if args.json_out else None
    except OSError as error:
        print(f"mii bench: --json-out {args.json_out}: {error.strerror or error}", file=err)
        return 2
    try:
        interrupted = False
        try:
            asyncio.run(run_bench(client, run, err))
        except KeyboardInterrupt:
            interrupted = True
            run.end = run.now() if run.start else 0.0
        report = build_report(run, client.deployment_name, interrupted)
        print(report_text(report), file=out)
        if json_out is not None:
            json.dump(report, json_out, indent=2)
            json_out.write("\n")
    finally:
        if json_out is not None:
            json_out.close()
    if interrupted:
        return 130
    if report["requests"]["failed"]:
        print(f"mii bench: {report['requests']['failed']} of {report['requests']['finished']} "
              "requests failed (see errors)", file=err)
        return 1
    return 0
