"""Progress of the slow steps of an evaluation: a line saying what is computed, then a tqdm bar on a
terminal, or else (CI and container logs) a line about every PROGRESS_EVERY_S seconds."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

log = logging.getLogger("genserve.eval")
Item = TypeVar("Item")
PROGRESS_EVERY_S = 10.0


def progress(items: Iterable[Item], total: int, what: str) -> Iterator[Item]:
    """Yield `items` (`total` of them) while reporting how far `what` has got."""
    log.info("%s", what)
    started = time.monotonic()
    if sys.stderr.isatty():
        yield from tqdm(items, total=total, desc=what, leave=False, file=sys.stderr)
    else:
        reported = started
        for done, item in enumerate(items, 1):
            yield item
            if time.monotonic() - reported >= PROGRESS_EVERY_S and done < total:
                log.info("%s: %d/%d", what, done, total)
                reported = time.monotonic()
    log.info("%s: done in %.1f s", what, time.monotonic() - started)
