"""`offline=true`: the Hugging Face libraries use local files and their cache only, never the network.

The switches (`HF_HUB_OFFLINE`, `HF_DATASETS_OFFLINE`, `TRANSFORMERS_OFFLINE`) are read when huggingface_hub,
datasets and transformers are imported, so the command line's `offline=true` is applied before any of them loads
(`cli.run_stage`); a preset or config file that sets it is read later, so `go_offline` also flips the flags of
libraries already imported. `offline=false` forces nothing: switches already in the environment stay.
"""

from __future__ import annotations

import os
import sys

SWITCHES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
TRUE = ("1", "true", "yes", "on")


def requested(args: list[str]) -> bool:
    """Whether the command line's last `offline=` override asks for offline mode."""
    values = [a.split("=", 1)[1] for a in args if "=" in a and a.split("=", 1)[0].lstrip("+~") == "offline"]
    return bool(values) and values[-1].strip().lower() in TRUE


def go_offline() -> None:
    for switch in SWITCHES:
        os.environ[switch] = "1"
    if (hub := sys.modules.get("huggingface_hub.constants")) is not None:
        hub.HF_HUB_OFFLINE = True
    if (datasets := sys.modules.get("datasets.config")) is not None:
        datasets.HF_HUB_OFFLINE = datasets.HF_DATASETS_OFFLINE = True


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in TRUE
