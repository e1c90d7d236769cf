"""Running a long-lived role: logging set up once, SIGINT/SIGTERM turn into a clean cancel."""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable

import trio


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # trio-websocket logs every handshake failure at length; ours say it in one line.
    logging.getLogger("trio-websocket").setLevel(logging.WARNING)


async def until_signalled(main: Callable[[], Awaitable[None]]) -> None:
    """Run `main` until it returns or SIGINT/SIGTERM arrives; either way, cancel cleanly."""
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

            async def run_main() -> None:
                await main()
                nursery.cancel_scope.cancel()

            nursery.start_soon(run_main)
            async for signum in signals:
                logging.getLogger("vectorlay").info("received %s, shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
