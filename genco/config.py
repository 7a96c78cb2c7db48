"""Runtime settings from the environment (../shared/interface.md, "Configuration")."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw.strip() else default
    except ValueError as error:
        raise SystemExit(f"{name}={raw!r} is not a number") from error


@dataclass(frozen=True)
class Settings:
    broker: str = field(default_factory=lambda: os.environ.get("GENCO_BROKER", ""))
    topic_prefix: str = field(default_factory=lambda: os.environ.get("GENCO_TOPIC_PREFIX", "genco."))
    click_window_s: float = field(default_factory=lambda: _float("GENCO_CLICK_WINDOW_S", 1800.0))
    state_dir: str = field(default_factory=lambda: os.environ.get("GENCO_STATE_DIR", "./state-data"))
    explore: float = field(default_factory=lambda: _float("GENCO_EXPLORE", 0.05))
