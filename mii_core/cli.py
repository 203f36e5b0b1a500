"""The ``mii`` console script: a thin front end over ``mii.serve`` / ``mii.client``.

    mii serve MODEL [--set key=value ...]   start a deployment (returns when it answers)
    mii list                                 deployments in the registry (a table)
    mii status NAME [--json]                 health, replicas, counters, latencies, KV use
    mii logs NAME [-n LINES]                 tail of the deployment log
    mii generate NAME PROMPT [--set ...]     one generation (streams with --stream)
    mii bench NAME [--concurrency C ...]     load-test a deployment (mii bench --help)
    mii stop NAME                            terminate the deployment
    mii plugins                              discovered engines, schedulers, transports

NAME is a deployment name, its model's name or path, or HOST:PORT (names never hold ':').
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict, List, Optional

from mii_core import bench_cli, cli_format
from mii_core.api import serve as deploy
from mii_core.deploy import logs, registry
from mii_core.errors import MIIError
from mii_core.plugins.discovery import discover, plugin_manager


def _pairs(items: List[str]) -> Dict[str, Any]:
    """``key=value`` strings -> dict; values parsed as JSON when possible."""
    result: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        try:
            result[key] = json.loads(value)
        except ValueError:
            result[key] = value
    return result


def _serve(args: argparse.Namespace) -> int:
    client = deploy.serve(args.model, **_pairs(args.set))
    print(f"{client.deployment_name} serving on {client.host}:{client.port}")
    return 0


def _list(args: argparse.Namespace) -> int:
    records = registry.list_records()
    if not records:
        print("no deployments")
        return 0
    alive = [(record, registry.supervisor_alive(record)) for record in records]
    print(cli_format.deployments_table(alive, time.time()))
    return 0


def _status(args: argparse.Namespace) -> int:
    client = deploy.client(args.name)
    record = registry.find_live(client.deployment_name)
    info = client.info()
    if record is not None:
        info["state"] = record.state
        info["uptime_s"] = round(time.time() - (record.ready_at or record.created_at), 1)
        info["log"] = record.log_path
    info["serving"] = client.is_serving()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(cli_format.status_text(dict(info, address=f"{client.host}:{client.port}")))
    return 0


def _logs(args: argparse.Namespace) -> int:
    record = registry.load(args.name) or registry.load(deploy.default_deployment_name(args.name))
    if record is None:
        print(f"no deployment record for {args.name!r}", file=sys.stderr)
        return 1
    print(logs.tail(record.log_path, args.lines), end="")
    return 0


def _generate(args: argparse.Namespace) -> int:
    client = deploy.client(args.name)
    params = _pairs(args.set)
    if args.stream:
        for chunk in client.stream(args.prompt, **params):
            print(chunk.generated_text, end="", flush=True)
        print()
        return 0
    for response in client.generate(args.prompt, **params):
        print(response.generated_text)
    return 0


def _bench(args: argparse.Namespace) -> int:
    return bench_cli.main(args, deploy.client(args.name))


def _stop(args: argparse.Namespace) -> int:
    deploy.client(args.name).terminate_server()
    print(f"stopped {args.name}")
    return 0


def _plugins(args: argparse.Namespace) -> int:
    for kind in ("engine", "scheduler", "transport", "plugin"):
        for info in discover(kind):
            status = f"BROKEN: {info.error}" if info.error else "ok"
            print(f"{kind:9} {info.name:22} {info.distribution} {info.version}  "
                  f"{info.target}  {status}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, including sub-commands added by plugins."""
    parser = argparse.ArgumentParser(prog="mii", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="start a deployment")
    p.add_argument("model")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any ModelConfig/MIIConfig field, e.g. --set replica_num=2")
    p.set_defaults(func=_serve)
    sub.add_parser("list", help="list deployments").set_defaults(func=_list)
    p = sub.add_parser("status", help="show a deployment's status")
    p.add_argument("name")
    p.add_argument("--json", action="store_true",
                   help="print the raw status record (the load balancer's Info, per replica)")
    p.set_defaults(func=_status)
    p = sub.add_parser("stop", help="terminate a deployment")
    p.add_argument("name")
    p.set_defaults(func=_stop)
    bench_cli.add_parser(sub, _bench)
    p = sub.add_parser("logs", help="show the end of a deployment's log")
    p.add_argument("name")
    p.add_argument("-n", "--lines", type=int, default=50)
    p.set_defaults(func=_logs)
    p = sub.add_parser("generate", help="generate text with a running deployment")
    p.add_argument("name")
    p.add_argument("prompt")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="generate parameters, e.g. --set max_new_tokens=32")
    p.set_defaults(func=_generate)
    sub.add_parser("plugins", help="list discovered plugins").set_defaults(func=_plugins)
    try:
        plugin_manager().hook.mii_add_cli_commands(subparsers=sub)
    except MIIError as error:  # `mii plugins` must still work to show what is broken
        print(f"mii: warning: plugin commands unavailable: {error}", file=sys.stderr)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Console-script entry point."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MIIError as error:
        print(f"mii: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
