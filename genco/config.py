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


# Kafka client security settings passed through to every client (never logged: they hold secrets).
_SECURITY_ENV = {
    "security_protocol": "GENCO_KAFKA_SECURITY_PROTOCOL",  # PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL
    "sasl_mechanism": "GENCO_KAFKA_SASL_MECHANISM",  # PLAIN, SCRAM-SHA-256, SCRAM-SHA-512
    "sasl_plain_username": "GENCO_KAFKA_SASL_USERNAME",
    "sasl_plain_password": "GENCO_KAFKA_SASL_PASSWORD",
    "ssl_cafile": "GENCO_KAFKA_SSL_CAFILE",
}


def _security() -> dict[str, str]:
    return {key: os.environ[name] for key, name in _SECURITY_ENV.items() if os.environ.get(name)}


@dataclass(frozen=True)
class Settings:
    broker: str = field(default_factory=lambda: os.environ.get("GENCO_BROKER", ""))
    topic_prefix: str = field(default_factory=lambda: os.environ.get("GENCO_TOPIC_PREFIX", "genco."))
    click_window_s: float = field(default_factory=lambda: _float("GENCO_CLICK_WINDOW_S", 1800.0))
    state_dir: str = field(default_factory=lambda: os.environ.get("GENCO_STATE_DIR", "./state-data"))
    explore: float = field(default_factory=lambda: _float("GENCO_EXPLORE", 0.05))
    checkpoint_every_s: float = field(default_factory=lambda: _float("GENCO_CHECKPOINT_EVERY_S", 30.0))
    metrics_port: int = field(default_factory=lambda: int(_float("GENCO_METRICS_PORT", 9464)))
    kafka_security: dict[str, str] = field(default_factory=_security, repr=False)
