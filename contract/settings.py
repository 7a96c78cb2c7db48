"""Runtime settings from the environment (docs/contract.md, "Configuration")."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from contract.window import JoinWindow


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw.strip() else default
    except ValueError as error:
        raise SystemExit(f"{name}={raw!r} is not a number") from error


# Kafka client security settings passed through to every client (never logged, never in a repr, never copied
# into another process's environment: they hold secrets). Agents read them from the environment they inherit.
_SECURITY_ENV = {
    "security_protocol": "GENCO_KAFKA_SECURITY_PROTOCOL",  # PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL
    "sasl_mechanism": "GENCO_KAFKA_SASL_MECHANISM",  # PLAIN, SCRAM-SHA-256, SCRAM-SHA-512
    "sasl_plain_username": "GENCO_KAFKA_SASL_USERNAME",
    "sasl_plain_password": "GENCO_KAFKA_SASL_PASSWORD",
    "ssl_cafile": "GENCO_KAFKA_SSL_CAFILE",  # CA bundle (PEM) that signed the brokers' certificates
    "ssl_certfile": "GENCO_KAFKA_SSL_CERTFILE",  # client certificate (PEM), for brokers that require one
    "ssl_keyfile": "GENCO_KAFKA_SSL_KEYFILE",  # its private key (PEM)
}
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
COMPRESSIONS = ("none", "gzip", "snappy", "lz4", "zstd")
AGENTS = ("joiner", "learner", "selector")  # the roles ``genco serve --agents`` runs, all by default


def _security() -> dict[str, str]:
    security = {key: os.environ[name] for key, name in _SECURITY_ENV.items() if os.environ.get(name)}
    protocol = security.get("security_protocol", "PLAINTEXT")
    if protocol not in SECURITY_PROTOCOLS:
        raise SystemExit(f"GENCO_KAFKA_SECURITY_PROTOCOL={protocol!r} is not one of {', '.join(SECURITY_PROTOCOLS)}")
    return security


def _count(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise SystemExit(f"{name}={raw!r} is not a whole number of at least 1")
    return int(raw)


def _choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name, "").strip().lower() or default
    if value not in choices:
        raise SystemExit(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class Settings:
    broker: str = field(default_factory=lambda: os.environ.get("GENCO_BROKER", ""))
    topic_prefix: str = field(default_factory=lambda: os.environ.get("GENCO_TOPIC_PREFIX", "genco."))
    click_window_s: float = field(default_factory=lambda: _float("GENCO_CLICK_WINDOW_S", 1800.0))
    state_dir: str = field(default_factory=lambda: os.environ.get("GENCO_STATE_DIR", "./state-data"))
    explore: float = field(default_factory=lambda: _float("GENCO_EXPLORE", 0.05))
    checkpoint_every_s: float = field(default_factory=lambda: _float("GENCO_CHECKPOINT_EVERY_S", 30.0))
    # The partitions genco gives selection-requests when it creates it: as many selectors answer at once as it
    # has (they share it in a consumer group; the rest stand by). Every other topic it creates has one.
    request_partitions: int = field(default_factory=lambda: _count("GENCO_REQUEST_PARTITIONS", 1))
    metrics_port: int = field(default_factory=lambda: int(_float("GENCO_METRICS_PORT", 9464)))
    # Loopback unless opened on purpose (GENCO_METRICS_HOST=0.0.0.0, as the image does inside its container).
    metrics_host: str = field(default_factory=lambda: os.environ.get("GENCO_METRICS_HOST", "127.0.0.1"))
    # Compression of what genco produces (bags, responses, dead letters); any codec is read on input.
    kafka_compression: str = field(default_factory=lambda: _choice("GENCO_KAFKA_COMPRESSION", "none", COMPRESSIONS))
    kafka_security: dict[str, str] = field(default_factory=_security, repr=False)

    @property
    def join_window(self) -> JoinWindow:
        """The join window these settings give: the one value the joiner and the learner read."""
        return JoinWindow(after_s=self.click_window_s)

    def shareable(self) -> dict:
        """The settings an agent process is started with: everything but the secrets (it reads those from the
        environment it inherits, so they are never copied into another variable)."""
        return {k: v for k, v in self.__dict__.items() if k != "kafka_security"}
