"""When a round's messages mostly rebuilt their client, the server says why and what to change."""

from __future__ import annotations

from strategies.ledger import rebuild_advice

ROUND = {"round": 3, "train_messages": 105, "client_rebuilds": 105, "client_live_max": 2}


def test_a_full_cache_that_misses_is_flagged_with_both_fixes():
    advice = rebuild_advice(ROUND, live_clients=2, max_active=8)
    assert advice == (
        "round 3: 105 of 105 training messages rebuilt their client from context.state, with "
        "every ClientApp process's cache full (live-clients=2, max-active-clients=8). Raise "
        "live-clients to the clients one process serves, or lower max-active-clients to "
        "live-clients x processes."
    )


def test_a_fresh_process_per_message_is_not_flagged():
    """Flower's stock deployment executor: every message rebuilds, the cache never fills."""
    assert rebuild_advice(ROUND | {"client_live_max": 1}, live_clients=2, max_active=8) is None


def test_few_rebuilds_or_few_messages_are_not_flagged():
    assert rebuild_advice(ROUND | {"client_rebuilds": 52}, live_clients=2, max_active=8) is None
    assert rebuild_advice(ROUND | {"train_messages": 6, "client_rebuilds": 6}, 2, 8) is None
    assert rebuild_advice(ROUND | {"client_rebuilds": 53}, live_clients=2, max_active=8)
