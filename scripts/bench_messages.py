#!/usr/bin/env python
"""Round-trip time of single messages (server -> one SuperNode -> server) in a deployment.

Runs a throw-away Flower app (written to a temporary directory) against a running deployment,
e.g. one started by ``scripts/deploy_local.sh start 1`` (``python -m deploy.local start 1``;
``scripts/measure_deployment.py`` starts one per setup). Its ServerApp sends one message at a
time to one node and times push -> reply (polling ``pull_messages`` every 5 ms):

  query.setup            a tiny message (a ConfigRecord), tiny reply
  train.forward-2MiB     2 MiB of float32 each way (one CSL batch of 32 at cut 1 of ResNet-8)
  train.forward-8MiB     8 MiB each way (one DSL chunk of 128 such activations)

Payloads are fresh random numbers every message (Flower de-duplicates identical chunks). The
ClientApp first imports ``--client-import`` (default ``flower_app.client_app``: torch and all our
modules, so a fresh ClientApp process pays what ours pays), then echoes the payload size back.

    FLWR_HOME=$DEPLOY_DIR/flwr-home python scripts/bench_messages.py --reps 5 --out rtt.json

prints min / median / max per message type (the first message of a run, which may pay a cold
start, is reported separately) and writes all samples to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deploy.local_superlink import write_app

APP = '''\
"""Ping-pong messages of a few sizes; timings go to run-config "out" (JSON)."""

import importlib
import json
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

KINDS = [("query.setup", "query.setup", 0),
         ("train.forward-2MiB", "train.forward", 2 << 20),
         ("train.forward-8MiB", "train.forward", 8 << 20)]
client = ClientApp()
server = ServerApp()


def _payload(nbytes: int) -> RecordDict:
    content = RecordDict({"config": ConfigRecord({"reply-bytes": nbytes})})
    if nbytes:
        x = np.random.default_rng().standard_normal(nbytes // 4, dtype=np.float32)
        content["arrays"] = ArrayRecord({"x": Array(x)})
    return content


def _echo(msg: Message, context: Context) -> Message:
    module = str(context.run_config.get("client-import", ""))
    if module:
        importlib.import_module(module)
    return Message(_payload(int(msg.content["config"]["reply-bytes"])), reply_to=msg)


client.query("setup")(_echo)
client.train("forward")(_echo)


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    deadline = time.monotonic() + 60
    while not list(grid.get_node_ids()):
        if time.monotonic() > deadline:
            raise RuntimeError("no SuperNode connected")
        time.sleep(0.1)
    node = sorted(grid.get_node_ids())[0]
    samples = {name: [] for name, _, _ in KINDS}
    first = None
    for _ in range(int(cfg["reps"])):
        for name, mtype, nbytes in KINDS:
            msg = Message(content=_payload(nbytes), dst_node_id=node, message_type=mtype)
            t0 = time.perf_counter()
            ids = list(grid.push_messages([msg]))
            while not (replies := list(grid.pull_messages(ids))):
                time.sleep(0.005)
            seconds = time.perf_counter() - t0
            reply = replies[0]
            if reply.has_error():
                raise RuntimeError(f"{name}: error reply {reply.error.code} {reply.error.reason}")
            if first is None:
                first = {"type": name, "seconds": seconds}
            else:
                samples[name].append(seconds)
    with open(cfg["out"], "w") as fh:
        json.dump({"first": first, "samples": samples}, fh)
'''


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connection", default="local-deployment")
    parser.add_argument("--reps", type=int, default=5, help="messages of each type")
    parser.add_argument("--out", type=Path, required=True, help="JSON with every sample")
    parser.add_argument("--client-import", default="flower_app.client_app")
    parser.add_argument("--flwr", default=str(Path(sys.executable).parent / "flwr"))
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    if "FLWR_HOME" not in os.environ:
        parser.error("set FLWR_HOME to the deployment's (e.g. $DEPLOY_DIR/flwr-home)")
    out = args.out.resolve()
    out.unlink(missing_ok=True)
    app_dir = Path(tempfile.mkdtemp(prefix="msg-bench-"))
    try:
        write_app(
            app_dir, "msg-bench", "msg_bench_app", APP, 'reps = 5\nout = ""\nclient-import = ""\n'
        )
        config = f"reps={args.reps} out='{out}' client-import='{args.client_import}'"
        env = os.environ | {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
        start = time.monotonic()
        proc = subprocess.run(
            [args.flwr, "run", str(app_dir), args.connection, "--stream", "--run-config", config],
            env=env,
            capture_output=True,
            text=True,
            timeout=args.timeout,
        )
        wall = time.monotonic() - start
    finally:
        shutil.rmtree(app_dir, ignore_errors=True)
    if not out.exists():  # `flwr run --stream` exits 0 even when the ServerApp failed
        print((proc.stdout + proc.stderr)[-4000:], file=sys.stderr)
        print("bench_messages: the run wrote no results", file=sys.stderr)
        return 1
    data = json.loads(out.read_text())
    data |= {"wall_seconds": wall, "run_id": _run_id(proc.stdout + proc.stderr)}
    out.write_text(json.dumps(data, indent=1))
    first = data["first"]
    print(f"first message ({first['type']}): {first['seconds']:.2f} s; flwr run {wall:.1f} s")
    print(f"{'message':<22}{'n':>3}{'min s':>8}{'median s':>10}{'max s':>8}")
    for name, values in data["samples"].items():
        if values:
            print(
                f"{name:<22}{len(values):>3}{min(values):>8.2f}"
                f"{statistics.median(values):>10.2f}{max(values):>8.2f}"
            )
    return 0


def _run_id(log: str) -> str | None:
    match = re.search(r"Successfully started run (\d+)", log)
    return match.group(1) if match else None


if __name__ == "__main__":
    sys.exit(main())
