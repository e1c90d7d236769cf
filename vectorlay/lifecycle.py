"""Running a long-lived role: logging set up once, SIGINT/SIGTERM turn into a clean cancel (and say so)."""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass

import trio

# The node a task works for, set by the agent (node/agent.py run_node) and inherited by every task
# it starts: `vectorlay dev` runs several nodes in one process, and its log lines say whose they are.
NODE_NAME: ContextVar[str | None] = ContextVar("vectorlay_node_name", default=None)


class NodeTag(logging.Filter):
    """Adds `node_tag` to each record: `[dev-1] ` for a line logged on behalf of node dev-1."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = NODE_NAME.get()
        record.node_tag = f"[{name}] " if name else ""
        return True


def setup_logging(verbose: bool = False, tag_nodes: bool = False) -> None:
    """`tag_nodes`: prefix lines logged for a node with its name (for several nodes in one process)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: " + ("%(node_tag)s" if tag_nodes else "") + "%(message)s",
        datefmt="%H:%M:%S",
    )
    if tag_nodes:
        for handler in logging.getLogger().handlers:
            handler.addFilter(NodeTag())
    # trio-websocket logs every handshake failure at length; ours say it in one line.
    logging.getLogger("trio-websocket").setLevel(logging.WARNING)


@dataclass
class CleanStop:
    """Whether a role was asked to stop (SIGINT, SIGTERM), set before its tasks are cancelled.

    A clean stop and a crash reach a task as the same cancellation; this tells them apart. The
    node agent tells the server it is restarting (keep my replicas routed) only on a clean stop:
    an agent dying of an error must leave routing at once."""

    requested: bool = False

    def request(self) -> None:
        self.requested = True


async def until_signalled(main: Callable[[], Awaitable[None]], clean_stop: CleanStop | None = None) -> None:
    """Run `main` until it returns or SIGINT/SIGTERM arrives; either way, cancel cleanly. A signal
    marks `clean_stop` before anything is cancelled."""
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

            async def run_main() -> None:
                await main()
                nursery.cancel_scope.cancel()

            nursery.start_soon(run_main)
            async for signum in signals:
                logging.getLogger("vectorlay").info("received %s, shutting down", signal.Signals(signum).name)
                if clean_stop is not None:
                    clean_stop.request()
                nursery.cancel_scope.cancel()
                break
