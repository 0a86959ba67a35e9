"""In-process split learning without Flower: the speed baseline and the tests' oracle.

Each client answers the same typed requests as behind the ClientApp (``SplitClient.train`` and
``SplitClient.evaluate``: its own chunking, steps and wire format), and the server segment
trains on what comes through the wire, in one process with no messages. Replies are consumed
in the strategy's turn order (``Turns``) and averaged with its ``FedAvg``, so for the same
config it reproduces a Flower run's weights. One ``SavedTensorsMeter`` watches both parties at
once, which is the paper's single-device setting: CSL's client graph is alive while the server
steps; a returned gradient is applied at once, so one client graph is held at a time.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from split_core.client import SplitClient
from split_core.compute import seeded_generator
from split_core.config import RunConfig, parse_overrides
from split_core.metering import SavedTensorsMeter
from split_core.payload import decode_activations, encode_gradient, encode_modules
from split_core.protocol import EvaluateRequest, TrainRequest
from split_core.steps import Phases
from strategies.aggregation import FedAvg
from strategies.exchange import Turns
from strategies.server_segment import ServerSegment


@dataclass
class ReferenceRun:
    cfg: RunConfig
    clients: list[SplitClient]
    server: ServerSegment
    history: list[dict[str, Any]] = field(default_factory=list)


def build(cfg: RunConfig, num_clients: int) -> ReferenceRun:
    clients = [
        SplitClient.create(cfg, pid, num_clients, cfg.data_dir) for pid in range(num_clients)
    ]
    meter = SavedTensorsMeter()
    server = ServerSegment(cfg)
    for party in [server, *clients]:
        party.meter = meter  # one device, one meter: the paper's measurement
    return ReferenceRun(cfg, clients, server)


def train(cfg: RunConfig, num_clients: int = 1, rounds: int | None = None) -> ReferenceRun:
    run = build(cfg, num_clients)
    weights = encode_modules(run.clients[0].modules)
    for rnd in range(1, (rounds or cfg.num_rounds) + 1):
        weights = train_round(run, rnd, weights)
        run.history[-1] |= evaluate(run, weights)
    return run


def train_round(run: ReferenceRun, rnd: int, weights: ArrayRecord) -> ArrayRecord:
    """One pass over every client's data in the strategy's turn order (``Turns``); then FedAvg."""
    cfg, server, meter = run.cfg, run.server, run.server.meter
    lr, wire = cfg.lr_at(rnd), cfg.payload_dtype
    server.set_lr(lr)
    meter.reset_peak()
    client_phases, server_phases = Phases(), Phases()
    losses, aux_losses, examples = [], [], 0
    t0 = time.perf_counter()
    requests = [TrainRequest(rnd, lr, weights=weights) for _ in run.clients]
    seen = [0] * len(run.clients)  # batches of each client the server has stepped on
    turns, fedavg = Turns(list(range(len(run.clients))), cfg.max_active_clients), FedAvg(weights)
    while (i := turns.current()) is not None:
        client = run.clients[i]
        reply, requests[i] = client.train(requests[i]), TrainRequest(rnd, lr)
        m = reply.metrics
        client_phases.forward += m.forward_seconds
        client_phases.backward += m.backward_seconds
        aux_losses.append(m.aux_loss_sum)
        if reply.activations is not None:  # through the wire, as the server receives it
            acts, y = decode_activations(
                reply.activations, client.shape, cfg.num_classes, server.device, wire
            )
            batches = math.ceil(len(y) / cfg.batch_size)
            flags = [client.method.needs_gradient(seen[i] + b) for b in range(batches)]
            result, grad = server.train_on(acts, y, server_phases, flags)
            seen[i] += batches
            losses.append(result.loss)
            examples += len(y)
            if grad is not None:  # applied at once, as the client's next message would
                rounding = seeded_generator(cfg.seed, rnd, client.partition_id, seen[i])
                client.apply_gradient(encode_gradient(grad, wire, rounding), client_phases)
        if m.done:  # the strategy adds each client as its final reply is consumed
            fedavg.add({k: a.numpy() for k, a in reply.weights.items()}, m.epoch_examples)
        turns.advance(m.done)
    uses_aux = run.clients[0].method.uses_aux_head
    run.history.append(
        {
            "round": rnd,
            "method": cfg.method,
            "train_loss": math.fsum(losses) / max(examples, 1),
            "aux_train_loss": math.fsum(aux_losses) / examples if uses_aux else None,
            "train_seconds": time.perf_counter() - t0,
            "train_examples": examples,
            "client_compute_seconds": client_phases.total,
            "server_compute_seconds": server_phases.total,
            "combined_peak_saved_bytes": meter.peak,
        }
    )
    return fedavg.result()


def evaluate(run: ReferenceRun, weights: ArrayRecord) -> dict[str, float | None]:
    """The clients' own evaluate handler, with the server segment on the activations."""
    correct = aux_correct = examples = 0
    for client in run.clients:
        request = EvaluateRequest(0, weights)
        while True:
            reply, request = client.evaluate(request), EvaluateRequest(0)
            if reply.activations is not None:
                acts, labels = decode_activations(
                    reply.activations,
                    client.shape,
                    run.cfg.num_classes,
                    run.server.device,
                    run.cfg.payload_dtype,
                )
                correct += run.server.evaluate_on(acts, labels, Phases()).correct
            aux_correct += reply.metrics.aux_correct
            examples += reply.metrics.num_examples
            if reply.metrics.done:
                break
    uses_aux = run.clients[0].method.uses_aux_head
    return {
        "test_accuracy": correct / examples if examples else None,
        "aux_test_accuracy": aux_correct / examples if examples and uses_aux else None,
    }


def client_weights(run: ReferenceRun) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in encode_modules(run.clients[0].modules).items()}


def main(argv: list[str]) -> None:
    """``python -m experiments.reference [--clients K] key=value ...``: one run, a line a round."""
    clients = 1
    if argv[:1] == ["--clients"]:
        clients, argv = int(argv[1]), argv[2:]
    overrides = parse_overrides(argv)
    run = train(RunConfig.from_run_config(overrides), clients)
    for h in run.history:
        aux = h["aux_test_accuracy"]
        print(
            f"round {h['round']}: test accuracy {100 * h['test_accuracy']:.1f}%"
            + ("" if aux is None else f", aux head {100 * aux:.1f}%")
            + f", train loss {h['train_loss']:.3f}, aux loss {h['aux_train_loss'] or 0:.3f}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
