"""Orthanc Python plugin: tell `medsim watch` at once when a study becomes stable or is deleted.

Orthanc (Debian: ``apt-get install orthanc-python``) loads it from its configuration::

    "Plugins": ["/usr/share/orthanc/plugins/libOrthancPython.so", ...],
    "PythonScript": "/path/to/medsim_notify.py",          // orthanc-python 4.0 (Debian 12); later: "Python": {"Path": ...}
    "MedsimNotify": {"Url": "http://127.0.0.1:8765/notify"}

and ``medsim watch PACS_URL --index DIR --listen 127.0.0.1:8765`` receives the notifications. A notification only
says "look now": the watcher reads Orthanc's change feed (or, for a deletion, compares the PACS's studies with the
index) as it would on its next round, so a lost notification costs latency, never a study. The POST runs in a
thread with a 2 s timeout and never blocks or fails Orthanc's change processing. The URL may also come from the
environment variable MEDSIM_WATCH_NOTIFY_URL.
"""

import json
import os
import threading
import urllib.request

import orthanc  # provided by the orthanc-python plugin

DEFAULT_URL = "http://127.0.0.1:8765/notify"


def _configured_url() -> str:
    try:
        config = json.loads(orthanc.GetConfiguration())
    except Exception:  # noqa: BLE001 - an unreadable configuration: use the default
        config = {}
    section = config.get("MedsimNotify") or {}
    return os.environ.get("MEDSIM_WATCH_NOTIFY_URL") or section.get("Url") or DEFAULT_URL


URL = _configured_url()


def _post(payload: dict) -> None:
    request = urllib.request.Request(URL, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=2).close()
    except Exception as exc:  # noqa: BLE001 - the watcher may be down; it catches up from the change feed
        orthanc.LogWarning(f"medsim_notify: {URL} did not take the notification ({exc})")


def on_change(change_type, level, resource_id):
    if change_type == orthanc.ChangeType.STABLE_STUDY:
        payload = {"change": "StableStudy", "id": resource_id}
    elif change_type == orthanc.ChangeType.DELETED and level == orthanc.ResourceType.STUDY:
        payload = {"change": "Deleted", "level": "Study", "id": resource_id}
    else:
        return
    threading.Thread(target=_post, args=(payload,), daemon=True).start()


orthanc.RegisterOnChangeCallback(on_change)
orthanc.LogWarning(f"medsim_notify: notifying {URL} of stable and deleted studies")
