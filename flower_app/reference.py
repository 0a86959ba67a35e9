"""In-process split learning without Flower: the speed baseline and the tests' oracle.

It runs the very same steps as the Flower apps (``SplitClient`` data and modules, the method's
client step, ``ServerSegment.train_on``, ``fedavg``) in one process, with no messages. Batches
are visited in the same order as the strategy's round-robin, so for the same config it
reproduces a Flower run's weights. One ``SavedTensorsMeter`` watches both parties at once, which
is the paper's single-device setting: CSL's client graph is alive while the server steps.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from flower_app.client import SplitClient
from split_core.compute import seeded_generator
from split_core.config import RunConfig, parse_overrides
from split_core.metering import SavedTensorsMeter
from split_core.payload import (
    decode_activations,
    decode_gradient,
    encode_activations,
    encode_gradient,
    encode_modules,
    load_modules,
)
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
    lr = cfg.lr_at(rnd)
    server.set_lr(lr)
    meter.reset_peak()
    client_phases, server_phases = Phases(), Phases()
    loss = aux_loss = 0.0
    examples = 0
    t0 = time.perf_counter()
    for client in run.clients:
        load_modules(weights, client.modules)
        client.epoch = rnd - 1
        for group in client.parts.optimizer.param_groups:
            group["lr"] = lr
    replies = [_replies(client) for client in run.clients]
    sent = [0] * len(run.clients)
    turns, fedavg = Turns(list(range(len(run.clients))), cfg.max_active_clients), FedAvg(weights)
    wire = cfg.payload_dtype
    while (i := turns.current()) is not None:
        client, method = run.clients[i], run.clients[i].method
        chunk = replies[i][sent[i]]
        with meter.track():
            outs, labels, pending = [], [], None
            for batch in chunk:  # the client's part of one message
                x, y = client.train_batch(rnd - 1, batch)
                acts, aux, pending = method.client_batch(client.parts, x, y, client_phases, batch)
                outs.append(acts)
                labels.append(y)
                aux_loss += aux.loss * len(y) if aux is not None else 0.0
            if chunk:  # through the wire, as the server receives it
                record = encode_activations(torch.cat(outs), torch.cat(labels), wire)
                acts, y = decode_activations(
                    record, client.shape, cfg.num_classes, server.device, wire
                )
                flags = [method.needs_gradient(b) for b in chunk]
                result, grad = server.train_on(acts, y, server_phases, flags)
                loss += result.loss
                examples += len(y)
            if chunk and grad is not None:
                rounding = seeded_generator(cfg.seed, rnd, client.partition_id, chunk[-1] + 1)
                record = encode_gradient(grad, wire, rounding)
                grad = decode_gradient(record, pending.acts, wire)
                method.client_gradient(client.parts, pending, grad, client_phases)
            del outs, pending
        sent[i] += 1
        finished = sent[i] == len(replies[i])
        if finished:  # the strategy adds each client as its final reply is consumed
            arrays = {k: a.numpy() for k, a in encode_modules(client.modules).items()}
            fedavg.add(arrays, len(client.train_idx))
        turns.advance(finished)
    run.history.append(
        {
            "round": rnd,
            "method": cfg.method,
            "train_loss": loss / max(examples, 1),
            "aux_train_loss": aux_loss / examples if run.clients[0].method.uses_aux_head else None,
            "train_seconds": time.perf_counter() - t0,
            "train_examples": examples,
            "client_compute_seconds": client_phases.total,
            "server_compute_seconds": server_phases.total,
            "combined_peak_saved_bytes": meter.peak,
        }
    )
    return fedavg.result()


def _replies(client: SplitClient) -> list[list[int]]:
    """The batches each of the client's training replies carries, as the ClientApp sends them
    (``SplitClient.chunk_budget``), a chunk ending early at a batch that waits for a gradient;
    after a last batch that waited (CSL), one more reply carries no batch, only the weights."""
    chunks, current = [], []
    for batch in range(client.num_batches):
        current.append(batch)
        budget = client.chunk_budget(batch - len(current) + 1)
        if client.method.needs_gradient(batch) or len(current) == budget:
            chunks.append(current)
            current = []
    if current:
        chunks.append(current)
    if not chunks or client.method.needs_gradient(client.num_batches - 1):
        chunks.append([])
    return chunks


def evaluate(run: ReferenceRun, weights) -> dict[str, float | None]:
    """The clients' own evaluate handler, with the server segment on the activations."""
    correct = aux_correct = examples = 0
    for client in run.clients:
        request = RecordDict({"arrays": weights, "config": ConfigRecord({"round": 0})})
        while True:
            reply = client.evaluate(request)
            request = RecordDict({"config": ConfigRecord({"round": 0})})
            if "acts" in reply:
                acts, labels = decode_activations(
                    reply["acts"],
                    client.shape,
                    run.cfg.num_classes,
                    run.server.device,
                    run.cfg.payload_dtype,
                )
                correct += run.server.evaluate_on(acts, labels, Phases()).correct
            aux_correct += int(reply["metrics"]["aux-correct"])
            examples += int(reply["metrics"]["num-examples"])
            if reply["metrics"]["done"]:
                break
    uses_aux = run.clients[0].method.uses_aux_head
    return {
        "test_accuracy": correct / examples if examples else None,
        "aux_test_accuracy": aux_correct / examples if examples and uses_aux else None,
    }


def client_weights(run: ReferenceRun) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in encode_modules(run.clients[0].modules).items()}


def main(argv: list[str]) -> None:
    """``python -m flower_app.reference [--clients K] key=value ...``: one run, a line a round."""
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
