"""Security basics: TLS to the broker works, SASL_SSL configures, and no secret leaks into a repr or a spec.

TLS is tried for real: the embedded broker advertises the port of a TLS-terminating proxy
in front of it, so every connection genco's clients make (kafka-python's admin client,
aiokafka's producer and consumer) is TLS, verified against a CA made here with openssl.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from contract.settings import Settings
from stream.embedded import EmbeddedBroker, free_port
from stream.kafka import Connection
from stream.serve import Supervisor

PASSWORD = "s3cret-Pa55word"
SASL_SSL_ENV = {"GENCO_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "GENCO_KAFKA_SASL_MECHANISM": "PLAIN",
                "GENCO_KAFKA_SASL_USERNAME": "genco", "GENCO_KAFKA_SASL_PASSWORD": PASSWORD}


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    """A CA and a server certificate for 127.0.0.1/localhost that it signed (ca.pem, server.pem, server.key)."""
    if not shutil.which("openssl"):
        pytest.skip("no openssl command to make a test CA with")
    d = tmp_path_factory.mktemp("tls")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=genco-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "1", "-extfile", "san.cnf")
    return d


@contextlib.contextmanager
def tls_proxy(listen_port: int, target_port: int, certificates: Path) -> Iterator[None]:
    """TLS on ``listen_port`` (the server certificate), plaintext to ``target_port``, in a thread of its own."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificates / "server.pem", certificates / "server.key")
    loop = asyncio.new_event_loop()
    started = threading.Event()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        broker_reader, broker_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(client_reader, broker_writer), pipe(broker_reader, client_writer))

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", listen_port, ssl=context)
        started.set()
        async with server:
            await server.serve_forever()

    def run() -> None:
        with contextlib.suppress(asyncio.CancelledError):  # how the proxy is stopped
            loop.run_until_complete(serve())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield
    finally:
        loop.call_soon_threadsafe(lambda: [task.cancel() for task in asyncio.all_tasks(loop)])
        thread.join(10)


@pytest.mark.integration
def test_genco_clients_talk_tls_to_the_broker_verified_by_the_ca_file(certificates, monkeypatch):
    proxy_port, broker_port = free_port(), free_port()
    monkeypatch.setenv("GENCO_KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("GENCO_KAFKA_SSL_CAFILE", str(certificates / "ca.pem"))
    with tls_proxy(proxy_port, broker_port, certificates), \
            EmbeddedBroker(port=broker_port, advertised_port=proxy_port) as broker:
        connection = Connection.from_settings(Settings(), broker.url)
        connection.ensure_topics(["tls.requests"])  # kafka-python's admin client, over TLS

        async def roundtrip() -> bytes:
            producer = connection.producer()
            await producer.start()
            await producer.send_and_wait("tls.requests", b'{"over": "tls"}')
            await producer.stop()
            consumer = connection.consumer("tls.requests", group="tls-test")
            await consumer.start()
            try:
                while True:
                    for records in (await consumer.getmany(timeout_ms=1000)).values():
                        return records[0].value
            finally:
                await consumer.stop()

        assert asyncio.run(asyncio.wait_for(roundtrip(), 60)) == b'{"over": "tls"}'

        async def untrusted() -> None:  # the system's CAs do not know the test CA: the handshake must fail
            producer = AIOKafkaProducer(bootstrap_servers=list(connection.servers), security_protocol="SSL",
                                        ssl_context=ssl.create_default_context(), request_timeout_ms=5000)
            try:
                await producer.start()
            finally:
                await producer.stop()

        with pytest.raises(Exception):  # noqa: B017 (aiokafka wraps the SSL error in its own)
            asyncio.run(untrusted())


def test_sasl_ssl_configures_every_client_with_an_ssl_context(certificates, monkeypatch):
    for name, value in {**SASL_SSL_ENV, "GENCO_KAFKA_SSL_CAFILE": str(certificates / "ca.pem")}.items():
        monkeypatch.setenv(name, value)
    connection = Connection.from_settings(Settings(), "kafka://127.0.0.1:9093")
    options = connection.client_options()
    assert "ssl_cafile" not in options, "aiokafka refuses ssl_cafile (it raised TypeError)"
    context = options["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.cert_store_stats()["x509_ca"] == 1, "the CA file is loaded"
    assert options["sasl_plain_password"] == PASSWORD and options["security_protocol"] == "SASL_SSL"

    async def construct() -> None:  # aiokafka checks the options when a client is made (in a loop)
        connection.producer()
        connection.consumer("t", group="g")

    asyncio.run(construct())


def test_no_secret_in_any_repr_or_in_the_agents_spec(monkeypatch):
    for name, value in SASL_SSL_ENV.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    connection = Connection.from_settings(settings, "kafka://127.0.0.1:9093")
    assert PASSWORD not in repr(settings) and PASSWORD not in repr(connection)
    spec = Supervisor(settings, "kafka://127.0.0.1:9093").spec("selector")
    assert PASSWORD not in spec, "the agents read credentials from their inherited environment, not from a copy"
    assert Settings(**__import__("json").loads(spec)["settings"]).kafka_security["sasl_plain_password"] == PASSWORD


def test_a_misspelt_security_setting_stops_genco_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("GENCO_KAFKA_SECURITY_PROTOCOL", "TLS")
    with pytest.raises(SystemExit, match="GENCO_KAFKA_SECURITY_PROTOCOL='TLS' is not one of"):
        Settings()
    monkeypatch.delenv("GENCO_KAFKA_SECURITY_PROTOCOL")
    monkeypatch.setenv("GENCO_KAFKA_COMPRESSION", "brotli")
    with pytest.raises(SystemExit, match="GENCO_KAFKA_COMPRESSION='brotli'"):
        Settings()
