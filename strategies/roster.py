"""Which clients take part in a round: set up, listed by the SuperLink, and not known dead.

A client that fails in a round (raises, times out, sends anything invalid) is left out of that
round only. A node that Flower reports dead (error 3 or 4: its message expired; 5: node
unavailable; 8: its ClientApp process crashed or hung, which is also what our warm executor
answers for a ClientApp that ran past reply-timeout) is not invited again until
``grid.get_node_ids()`` has dropped it and shows it back, which is what a restarted SuperNode
with the same authentication key looks like (a node whose ClientApp crashed usually stays
listed: it sits out the rest of the run unless its SuperNode reconnects). Any
client that failed is set up again before it next trains: a restarted SuperNode has lost its
``context.state``, and set-up keeps the state of one that has not.
"""

from __future__ import annotations

from dataclasses import dataclass

DEAD_CODES = frozenset({3, 4, 5, 8})


@dataclass(frozen=True)
class ClientInfo:
    node_id: int
    partition_id: int
    train_examples: int
    test_examples: int
    data_source: str
    device: str
    cpus: float
    gpus: float
    torch_threads: int
    state_bytes: int


class Roster:
    def __init__(self, clients: list[ClientInfo]) -> None:
        self.clients = sorted(clients, key=lambda c: c.partition_id)
        self.dead: set[int] = set()
        self.gone: set[int] = set()  # dead nodes seen missing from the SuperLink's list since
        self.needs_setup: set[int] = set()

    def note_failures(self, failures: dict[int, str], codes: dict[int, int]) -> None:
        for node in failures:
            self.needs_setup.add(node)
            if codes.get(node) in DEAD_CODES:
                self.dead.add(node)

    def for_round(self, listed: set[int]) -> tuple[list[ClientInfo], dict[int, str]]:
        """This round's clients, and the reason each other client is left out."""
        for node in list(self.dead):
            if node not in listed:
                self.gone.add(node)
            elif node in self.gone:  # back after being dropped: invite it again
                self.dead.discard(node)
                self.gone.discard(node)
        taking_part, left_out = [], {}
        for client in self.clients:
            if client.node_id in self.dead:
                left_out[client.node_id] = "node unavailable: not invited until it is back"
            elif client.node_id not in listed:
                left_out[client.node_id] = "node not connected to the SuperLink"
            else:
                taking_part.append(client)
        return taking_part, left_out

    def replace(self, client: ClientInfo) -> None:
        """A client set up again (its answers may differ, e.g. a new data path)."""
        self.clients = sorted(
            [c for c in self.clients if c.node_id != client.node_id] + [client],
            key=lambda c: c.partition_id,
        )
        self.needs_setup.discard(client.node_id)


def first_reason(*failures: dict[int, str]) -> dict[int, str]:
    """One reason per client: the first thing that went wrong with it this round."""
    merged: dict[int, str] = {}
    for failure in failures:
        for node, why in failure.items():
            merged.setdefault(node, why)
    return merged
