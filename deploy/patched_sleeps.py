"""Flower's SuperNode and ServerApp with the sleeps flwr 1.42.0 hard-codes on the message path
shortened. With a warm ClientApp process these sleeps are most of what is left of a round trip.

    python -m deploy.patched_sleeps supernode <flower-supernode arguments>
    python -m deploy.patched_sleeps serverapp <flwr-serverapp arguments>

Each is Flower's own program; only names that the patched module looks up at call time are
replaced (``time``, ``pull_objects``, ``_pull_and_store_message``), after checking that the
functions still contain the sleeps they shorten. Any other flwr version is refused.
Measurements: docs/deployment.md.
"""

from __future__ import annotations

import sys
import time


def idle_poll(idle_seconds: float, shortest: float, longest: float) -> float:
    """Wait before the next poll: a tenth of the time idle so far, within [shortest, longest].

    Right after a message the next one usually follows within milliseconds to a second (CSL: the
    server's step; DSL: the next chunk), so poll often; a long-idle node polls rarely. A message
    arriving after T s idle is seen at most ~0.1 T (+ shortest) late.
    """
    return min(longest, max(shortest, 0.1 * idle_seconds))


IDLE_POLL_SHORTEST = 0.02  # the SuperNode's pulls from the SuperLink: 20 ms ... Flower's 3 s
REPLY_POLL = 0.01  # Flower: 0.5 s between looks for the ClientApp's reply (an in-memory check)


def supernode_main(argv: list[str]) -> int:
    """``flower-supernode <argv>`` with shorter sleeps on the message path.

    flwr/supernode/start_client_internal.py hard-codes them: 3 s after every empty pull from the
    SuperLink, 0.5 s between looks for the ClientApp's reply (and for its objects), and a 1 s
    (doubling) back-off for objects of a message not yet uploaded. Here an empty pull waits a
    tenth of the time since the last message, from 20 ms up to Flower's 3 s (``idle_poll``),
    reply looks take 10 ms, and object pulls start at 20 ms.
    """
    import functools
    import inspect
    import types

    import flwr.supernode.start_client_internal as sci
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.logger import update_console_handler
    from flwr.supernode.cli.flower_supernode import flower_supernode

    expected = {
        sci.start_client_internal: "time.sleep(3)",
        sci._push_messages: "time.sleep(0.5)",
        sci._pull_and_store_message: "pull_objects(",
    }
    for func, text in expected.items():
        if text not in inspect.getsource(func):
            print(f"patched_sleeps: {func.__name__} lacks {text!r}; not patching", file=sys.stderr)
            return 2

    real_sleep, last_message = time.sleep, [time.monotonic()]
    pull_and_store = sci._pull_and_store_message

    def timed_pull_and_store(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        run_id = pull_and_store(*args, **kwargs)
        if run_id is not None:
            last_message[0] = time.monotonic()
        return run_id

    def sleep(seconds: float) -> None:
        if seconds == 3:  # the idle pull loop
            seconds = idle_poll(time.monotonic() - last_message[0], IDLE_POLL_SHORTEST, 3.0)
        elif seconds == 0.5:  # waiting for the reply, or its objects, in the SuperNode's state
            seconds = REPLY_POLL
        real_sleep(seconds)

    fast_time = types.ModuleType("time")
    fast_time.__dict__.update({k: v for k, v in vars(time).items() if not k.startswith("__")})
    fast_time.sleep = sleep
    sci.time = fast_time
    sci._pull_and_store_message = timed_pull_and_store
    sci.pull_objects = functools.partial(
        inflatable_utils.pull_objects, initial_backoff=0.02, backoff_cap=1.0
    )
    update_console_handler(timestamps=True)  # ms timestamps: where a round trip's time goes
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()
    return 0


def serverapp_main(argv: list[str]) -> int:
    """``flwr-serverapp <argv>`` whose reply pulls start their object back-off at 20 ms.

    The SuperLink hands a reply to the ServerApp as soon as the reply message is stored, while
    the SuperNode may still be uploading its arrays; flwr's grid (superlink/grid/http_grid.py)
    then waits 1 s (doubling, +-20 %) before asking again. Only the grid module's name
    ``pull_objects`` is replaced.
    """
    import functools
    import inspect

    from flwr.supercore.inflatable import inflatable_utils
    from flwr.superlink.cli import flwr_serverapp
    from flwr.superlink.grid import http_grid

    if "pull_objects(" not in inspect.getsource(http_grid.HttpGrid.pull_messages):
        print("patched_sleeps: HttpGrid.pull_messages changed; not patching", file=sys.stderr)
        return 2
    http_grid.pull_objects = functools.partial(
        inflatable_utils.pull_objects, initial_backoff=0.02, backoff_cap=1.0
    )
    sys.argv = ["flwr-serverapp", *argv]
    flwr_serverapp()
    return 0


def main(argv: list[str] | None = None) -> int:
    from deploy.runtime_api import check_flwr_version

    argv = sys.argv[1:] if argv is None else argv
    if error := check_flwr_version("patched_sleeps"):
        print(error, file=sys.stderr)
        return 2
    programs = {"supernode": supernode_main, "serverapp": serverapp_main}
    if not argv or argv[0] not in programs:
        print("usage: python -m deploy.patched_sleeps supernode|serverapp ARGS", file=sys.stderr)
        return 2
    return programs[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
