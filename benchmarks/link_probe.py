"""What one Flower message costs here: latency and bandwidth of the link the app sees.

    python benchmarks/link_probe.py                    # Flower's simulation engine, in process
    python benchmarks/link_probe.py --mib 16 --repeats 20

A ServerApp sends one client messages of 0 bytes and of ``--mib`` MiB of random data (random,
so Flower's content-addressed chunks cannot be de-duplicated), through the same push/poll loop
the strategy uses (``strategies.exchange.Exchange``); the client answers with an empty reply.
The median round trip of the empty message is 2 x latency; the extra time of the big one is
its size over the bandwidth. ``benchmarks/network_model.py`` takes both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from strategies.exchange import Exchange
from strategies.nodes import wait_for_nodes
from strategies.phases import QueryPhase

client = ClientApp()


@client.query("echo")
def echo(msg: Message, context: Context) -> Message:
    return Message(RecordDict(), reply_to=msg)


def probe(grid: Grid, payload_bytes: int, repeats: int) -> list[float]:
    (node,) = wait_for_nodes(grid, 1, settle=0.5, timeout=120)
    rng = np.random.default_rng(0)
    times = []
    for _ in range(repeats + 1):  # the first one also starts the actor: dropped
        content = RecordDict()
        if payload_bytes:
            data = rng.integers(0, 256, payload_bytes, dtype=np.uint8)
            content["data"] = ArrayRecord({"x": Array(data)})
        message = Message(content=content, dst_node_id=node, message_type="query.echo")
        t0 = time.perf_counter()
        Exchange(grid, 600, window=1, max_queued=1).run(QueryPhase([message]))
        times.append(time.perf_counter() - t0)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=16.0)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    size = int(args.mib * 2**20)
    result: dict = {}
    server = ServerApp()

    @server.main()
    def main_(grid: Grid, context: Context) -> None:
        empty = statistics.median(probe(grid, 0, args.repeats))
        full = statistics.median(probe(grid, size, args.repeats))
        result.update(
            latency_s=empty / 2,
            bandwidth_bytes_per_s=size / max(full - empty, 1e-9),
            empty_round_trip_s=empty,
            payload_round_trip_s=full,
            payload_bytes=size,
        )

    run_simulation(server_app=server, client_app=client, num_supernodes=1)
    print(json.dumps(result, indent=2))
    print(
        f"simulation: latency {1000 * result['latency_s']:.1f} ms one way, "
        f"bandwidth {result['bandwidth_bytes_per_s'] / 1e6:.0f} MB/s"
    )


if __name__ == "__main__":
    main()
