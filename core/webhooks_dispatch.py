"""The webhook dispatcher as its own process: ``python -m core.webhooks_dispatch`` sends due
deliveries every ``webhook_poll_interval_s`` until SIGTERM or Ctrl-C (several may run; see
:func:`core.webhooks.deliver_due`). ``--once`` makes one pass and exits."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from core.db import make_engine, make_sessionmaker
from core.settings import get_settings
from core.webhooks import deliver_due

log = logging.getLogger("distillery.webhooks")


def main(argv: list[str] | None = None) -> int:
    """Run the dispatcher loop (or one pass with ``--once``); returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--once", action="store_true", help="one pass, then exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    settings = get_settings()
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while True:
            try:
                n = deliver_due(settings, sessions)
                if n:
                    log.info("webhook dispatcher: %d attempts", n)
            except Exception:
                log.exception("webhook dispatcher pass failed")
            if args.once or stop.wait(settings.webhook_poll_interval_s):
                return 0
    finally:
        engine.dispose()


if __name__ == "__main__":
    raise SystemExit(main())
