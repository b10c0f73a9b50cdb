"""How a child process tells its supervisor about itself.

``sipcluster run`` starts each load balancer and worker with an inherited pipe
whose file descriptor is in ``SIPCLUSTER_NOTIFY_FD`` (after systemd's
sd_notify).  The child writes one JSON object per line: ``{"event": "ready",
"id": ..., "http": "host:port", "lease": ...}`` once it serves (the supervisor
revokes that lease should the child die), ``{"event": "draining"}`` when it
starts draining, ``{"event": "lease", "lease": ...}`` when its lease expired in
etcd and a new one replaced it (``cluster/membership.py``).  A process
started by hand has no such variable and notifies nobody.  The descriptor
stays open: the supervisor sees end-of-file when the child exits.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

__all__ = ["NOTIFY_FD", "notify", "notify_ready"]

log = logging.getLogger(__name__)

NOTIFY_FD = "SIPCLUSTER_NOTIFY_FD"
"""The environment variable naming the inherited descriptor to write to."""


def notify(event: str, **fields: Any) -> bool:
    """Write ``{"event": event, **fields}`` as one JSON line to the notify descriptor.

    Returns whether a line was written: False without ``SIPCLUSTER_NOTIFY_FD``, or
    when the descriptor is unusable (logged as a warning; never raises).
    """
    text = os.environ.get(NOTIFY_FD)
    if not text:
        return False
    line = (json.dumps({"event": event, **fields}, separators=(",", ":")) + "\n").encode()
    try:
        descriptor = int(text)
        view = memoryview(line)
        while view:
            view = view[os.write(descriptor, view) :]
    except (ValueError, OSError) as error:
        log.warning("cannot notify the parent process on %s=%s: %s", NOTIFY_FD, text, error)
        return False
    return True


def notify_ready(process_id: str, http: str, lease: int | None = None) -> bool:
    """Tell the supervisor that ``process_id`` is ready and serves HTTP on ``http``
    (``host:port``); ``lease`` is its etcd lease.  See ``notify``."""
    if lease is None:
        return notify("ready", id=process_id, http=http)
    return notify("ready", id=process_id, http=http, lease=lease)
