"""The container set-up (docker-compose.yml, Dockerfile, .dockerignore), checked without a container engine.

The YAML checks need PyYAML only. The docker compose CLI check and the JSON-schema check run where
the tools (and, for the schema, a copy of the compose-spec schema on disk) are present, and skip
with the reason otherwise: nothing here downloads anything.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from contract.settings import AGENTS

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# Kafka's own security protocol names: a listener named after one needs no protocol-map entry.
KAFKA_PROTOCOLS = {"PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"}


# ---------------------------------------------------------------- helpers: compose


@pytest.fixture(scope="module")
def compose() -> dict:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (it belongs in the [test] extra)")
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict), "docker-compose.yml has no services"
    return doc


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def interpolate(value: object) -> str:
    """Compose's ${VAR:-default} / ${VAR-default} / ${VAR} / $$, resolved as if the shell set nothing."""

    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return match.group("default") or ""

    pattern = r"\$\$|\$\{(?P<name>\w+)(?:(?::?-)(?P<default>[^}]*)|[:?][^}]*)?\}|\$(?P<bare>\w+)"
    return re.sub(pattern, one, str(value))


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: interpolate(value) for key, value in env.items() if value is not None}


def command(service: dict) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [interpolate(c) for c in cmd]


def depends_on(service: dict) -> dict[str, str]:
    """Dependency name -> condition (the short list form means service_started)."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def published_ports(service: dict) -> dict[int, int]:
    """Container port -> host port, for the TCP ports that a service publishes."""
    ports = {}
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            if entry.get("protocol", "tcp") == "tcp" and entry.get("published") is not None:
                ports[int(entry["target"])] = int(entry["published"])
            continue
        spec, _, protocol = str(entry).partition("/")
        if protocol not in ("", "tcp"):
            continue
        parts = spec.split(":")
        assert len(parts) >= 2, f"port {entry!r} publishes nothing on the host (a random host port at best)"
        ports[int(parts[-1])] = int(parts[-2])
    return ports


def published_host_addresses(service: dict) -> list[str]:
    """The host address each published port binds ("" where it binds every interface)."""
    addresses = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            addresses.append(entry.get("host_ip", ""))
            continue
        parts = str(entry).partition("/")[0].split(":")
        addresses.append(":".join(parts[:-2]) if len(parts) > 2 else "")
    return addresses


def volume_mounts(service: dict) -> dict[str, str]:
    """Container path -> source (a named volume or a host path)."""
    mounts = {}
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            mounts[entry["target"]] = entry.get("source", "")
        else:
            parts = str(entry).split(":")
            mounts[parts[1] if len(parts) > 1 else parts[0]] = parts[0] if len(parts) > 1 else ""
    return mounts


def seconds(duration: object) -> float:
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", str(duration))
    assert parts and "".join(n + u for n, u in parts) == str(duration), f"unreadable duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def listeners(value: str) -> dict[str, tuple[str, int]]:
    """Kafka's NAME://host:port,... -> {NAME: (host, port)}."""
    out = {}
    for item in value.split(","):
        match = re.fullmatch(r"\s*(\w+)://([^:]*):(\d+)\s*", item)
        assert match, f"unreadable Kafka listener {item!r}"
        out[match.group(1)] = (match.group(2), int(match.group(3)))
    return out


def broker_addresses(url: str) -> set[tuple[str, int]]:
    match = re.fullmatch(r"kafka://(.+)", url)
    assert match, f"broker {url!r} is not kafka://host:port[,host:port]"
    addresses = set()
    for item in match.group(1).split(","):
        host, _, port = item.strip().rpartition(":")
        assert host and port.isdigit(), f"broker address {item!r} is not host:port"
        addresses.add((host, int(port)))
    return addresses


def names_on_network(compose: dict, name: str) -> set[str]:
    """The host names under which other containers reach a service."""
    service = compose["services"][name]
    names = {name}
    if service.get("hostname"):
        names.add(service["hostname"])
    if service.get("container_name"):
        names.add(service["container_name"])
    networks = service.get("networks")
    if isinstance(networks, dict):
        for spec in networks.values():
            names.update((spec or {}).get("aliases") or [])
    return names


def kafka_service(compose: dict) -> tuple[str, dict]:
    found = [(n, s) for n, s in compose["services"].items() if str(s.get("image", "")).startswith("apache/kafka")]
    assert len(found) == 1, "expected exactly one service on the official apache/kafka image"
    return found[0]


def internal_kafka_addresses(compose: dict) -> set[tuple[str, int]]:
    """Advertised listeners that containers on the compose network can reach."""
    name, kafka = kafka_service(compose)
    advertised = listeners(environment(kafka)["KAFKA_ADVERTISED_LISTENERS"])
    reachable = names_on_network(compose, name)
    return {(host, port) for host, port in advertised.values() if host in reachable}


def service_running(compose: dict, subcommand: str) -> tuple[str, dict]:
    found = [(n, s) for n, s in compose["services"].items() if subcommand in command(s)[:2]]
    assert len(found) == 1, f"expected exactly one service running `genco {subcommand}`"
    return found[0]


def serve_services(compose: dict) -> dict[str, dict]:
    """The services that run ``genco serve`` (each some of the roles)."""
    found = {n: s for n, s in compose["services"].items() if command(s)[:2] == ["genco", "serve"]}
    assert found, "no service runs `genco serve`"
    return found


def roles(service: dict) -> list[str]:
    """The agents a ``genco serve`` service runs (``--agents``; all of them without it)."""
    argv = command(service)
    return argv[argv.index("--agents") + 1].split(",") if "--agents" in argv else list(AGENTS)


def replicas(service: dict) -> int:
    return int((service.get("deploy") or {}).get("replicas", 1))


# ---------------------------------------------------------------- helpers: Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            instructions.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def exec_form(args: str) -> list[str]:
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return ["/bin/sh", "-c", args]
    assert isinstance(value, list), f"{args!r} is neither exec nor shell form"
    return value


def installs_project(run: str) -> bool:
    return re.search(r"\bpip install\b(?:\s+-\S+)*\s+(?:\.|/app)(?:\s|$|&|;)", run) is not None


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders wins."""
    prefixes = ["/".join(path.split("/")[: i + 1]) for i in range(path.count("/") + 1)]
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = (raw[1:] if negate else raw).strip().strip("/")
        regex = ""
        for token in re.findall(r"\*\*/|\*\*|\*|\?|[^*?]+", pattern):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token) or re.escape(token)
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


# ---------------------------------------------------------------- compose: structure


def test_every_dependency_exists_and_there_is_no_cycle(compose):
    services = compose["services"]
    for name, service in services.items():
        for dep in depends_on(service):
            assert dep in services, f"{name} depends on {dep}, which is no service"

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"depends_on cycle: {' -> '.join((*path, name))}"
        for dep in depends_on(services[name]):
            visit(dep, (*path, name))

    for name in services:
        visit(name, ())


def test_named_volumes_are_declared(compose):
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for target, source in volume_mounts(service).items():
            if source and not source.startswith((".", "/", "~", "$")):
                assert source in declared, f"{name} mounts volume {source!r} on {target}, not declared under volumes:"


# ---------------------------------------------------------------- compose: Kafka


def test_kafka_is_a_pinned_single_node_kraft_broker_and_controller(compose):
    name, kafka = kafka_service(compose)
    assert re.fullmatch(r"apache/kafka:\d+\.\d+\.\d+", kafka["image"]), "pin the Kafka image to a release"
    env = environment(kafka)
    assert {r.strip() for r in env["KAFKA_PROCESS_ROLES"].split(",")} == {"broker", "controller"}

    own = listeners(env["KAFKA_LISTENERS"])
    controller_names = {n.strip() for n in env["KAFKA_CONTROLLER_LISTENER_NAMES"].split(",")}
    assert controller_names <= set(own), "the controller listener is not among KAFKA_LISTENERS"
    protocol_map = dict(item.split(":", 1) for item in env.get("KAFKA_LISTENER_SECURITY_PROTOCOL_MAP", "").split(","))
    for listener in own:
        assert listener in protocol_map or listener in KAFKA_PROTOCOLS, f"listener {listener} has no security protocol"

    # Single quorum voter: this node, at its controller listener, under a name it is reachable by.
    voters = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    assert len(voters) == 1, "a single-node set-up has one quorum voter"
    match = re.fullmatch(r"(\d+)@([^:]+):(\d+)", voters[0].strip())
    assert match, f"unreadable quorum voter {voters[0]!r}"
    assert int(match.group(1)) == int(env["KAFKA_NODE_ID"]), "the quorum voter is not this node's id"
    assert match.group(2) in names_on_network(compose, name) | {"localhost"}
    assert int(match.group(3)) in {own[n][1] for n in controller_names}, "the voter's port is no controller listener"

    # One broker: internal topics cannot ask for more replicas than that.
    assert int(env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"]) == 1
    assert int(env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"]) == 1
    assert int(env.get("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", 1)) <= 1


def test_kafka_advertises_only_listeners_it_has(compose):
    _, kafka = kafka_service(compose)
    env = environment(kafka)
    own = listeners(env["KAFKA_LISTENERS"])
    advertised = listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    controller_names = {n.strip() for n in env["KAFKA_CONTROLLER_LISTENER_NAMES"].split(",")}
    for listener, (_, port) in advertised.items():
        assert listener in own, f"advertised listener {listener} is not in KAFKA_LISTENERS"
        assert own[listener][1] == port, f"{listener} is advertised on port {port} but listens on {own[listener][1]}"
        assert listener not in controller_names, "a broker must not advertise its controller listener"
    inter_broker = env.get("KAFKA_INTER_BROKER_LISTENER_NAME", "PLAINTEXT")
    assert inter_broker in advertised, "the inter-broker listener is not advertised"


def test_kafka_external_listener_is_published_on_the_port_it_advertises(compose):
    _, kafka = kafka_service(compose)
    env = environment(kafka)
    own = listeners(env["KAFKA_LISTENERS"])
    ports = published_ports(kafka)
    host_side = {n: a for n, a in listeners(env["KAFKA_ADVERTISED_LISTENERS"]).items() if a[0] == "localhost"}
    assert host_side, "no listener is advertised for clients on the host (localhost)"
    for listener, (_, port) in host_side.items():
        container_port = own[listener][1]
        assert ports.get(container_port) == port, (
            f"{listener} is advertised as localhost:{port}: publish host port {port} to container port {container_port}"
        )


def test_kafka_healthcheck_lists_topics_on_a_broker_listener(compose):
    _, kafka = kafka_service(compose)
    test = kafka.get("healthcheck", {}).get("test")
    assert test, "kafka has no healthcheck, so depends_on: service_healthy would never be met"
    argv = test if isinstance(test, list) else ["CMD-SHELL", test]
    line = " ".join(argv[1:]) if argv[0] in ("CMD", "CMD-SHELL") else " ".join(argv)
    assert "kafka-topics.sh" in line and "--list" in line
    match = re.search(r"--bootstrap-server[ =](\S+):(\d+)", line)
    assert match, "the healthcheck names no --bootstrap-server"
    env = environment(kafka)
    controller_names = {n.strip() for n in env["KAFKA_CONTROLLER_LISTENER_NAMES"].split(",")}
    broker_ports = {port for n, (_, port) in listeners(env["KAFKA_LISTENERS"]).items() if n not in controller_names}
    assert int(match.group(2)) in broker_ports, "the healthcheck bootstraps from a port no broker listener has"


# ---------------------------------------------------------------- compose: genco and the simulator


def test_genco_serves_against_the_kafka_service_once_it_is_healthy(compose):
    internal = internal_kafka_addresses(compose)
    kafka_name, _ = kafka_service(compose)
    for name, genco in serve_services(compose).items():
        addresses = broker_addresses(environment(genco)["GENCO_BROKER"])
        assert addresses <= internal, f"{name}: GENCO_BROKER {sorted(addresses)} is not kafka's {sorted(internal)}"
        assert depends_on(genco).get(kafka_name) == "service_healthy", f"{name} must wait for a healthy kafka"


def test_every_role_runs_and_the_selectors_twice(compose):
    """Selectors are stateless and scale out; the joiner runs once (a standby would join the whole retained input
    again when it took over: docs/operations.md, "Many processes")."""
    instances = {role: 0 for role in AGENTS}
    for name, genco in serve_services(compose).items():
        assert set(roles(genco)) <= set(AGENTS), f"{name} runs a role genco does not have: {roles(genco)}"
        for role in roles(genco):
            instances[role] += replicas(genco)
    assert instances["learner"] == 1 and instances["joiner"] == 1 and instances["selector"] >= 2, instances


def test_every_selector_gets_a_partition_of_the_requests(compose):
    """Selectors share selection-requests in one consumer group: a selector beyond its partition count would stand
    idle. Every service that may create the topic (any genco serve, and genco simulate) must give it as many as
    there are selectors."""
    services = serve_services(compose)
    selectors = sum(replicas(genco) for genco in services.values() if "selector" in roles(genco))
    simulator, simulate = service_running(compose, "simulate")
    for name, genco in {**services, simulator: simulate}.items():
        partitions = int(environment(genco).get("GENCO_REQUEST_PARTITIONS", "1"))
        assert partitions >= selectors, f"{name} would create selection-requests with {partitions} for {selectors}"


def test_stateful_roles_keep_their_state_on_a_volume_of_their_own(compose):
    """The joiner's pending impressions live in its state dir (the learner's checkpoints are also on Kafka):
    a named volume each, never one volume for two containers (RocksDB opens a directory once)."""
    owners: dict[str, str] = {}
    for name, genco in serve_services(compose).items():
        state_dir = environment(genco).get("GENCO_STATE_DIR")
        assert state_dir and state_dir.startswith("/"), f"{name}: set GENCO_STATE_DIR to an absolute path"
        source = volume_mounts(genco).get(state_dir.rstrip("/"))
        if "joiner" in roles(genco) or "learner" in roles(genco):
            assert source, f"{name}: nothing is mounted on GENCO_STATE_DIR={state_dir}: state dies with the container"
        if source:
            assert source in (compose.get("volumes") or {}), f"{name}: {source!r} is not a named volume"
            assert replicas(genco) == 1, f"{name}'s {replicas(genco)} replicas would share the volume {source!r}"
            assert source not in owners, f"{name} and {owners.get(source)} share the volume {source!r}"
            owners[source] = name


def test_genco_metrics_port_is_published(compose):
    published = []
    for name, genco in serve_services(compose).items():
        port = int(environment(genco).get("GENCO_METRICS_PORT", 9464))
        health = genco.get("healthcheck", {}).get("test")
        if health:
            probed = re.findall(r"localhost:(\d+)", " ".join(health) if isinstance(health, list) else health)
            assert probed in ([], [str(port)]), f"{name}'s healthcheck probes port {probed}, metrics on {port}"
        if port in published_ports(genco):
            assert replicas(genco) == 1, f"{name}'s replicas cannot all publish host port {port}"
            published.append(name)
    assert published, "no genco service publishes its metrics port"


def test_genco_restarts_and_has_time_to_shut_down(compose):
    for name, genco in serve_services(compose).items():
        assert genco.get("restart") in ("unless-stopped", "always"), name
        assert seconds(genco.get("stop_grace_period", "10s")) >= 30, f"give {name} time to write its last snapshot"


def test_genco_image_is_built_from_this_repository(compose):
    for name, genco in serve_services(compose).items():
        build = genco.get("build")
        assert build, f"{name} must be built from the Dockerfile (a service that only names the image pulls it)"
        context = build if isinstance(build, str) else build.get("context", ".")
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        assert (COMPOSE.parent / context).resolve() == ROOT
        assert (ROOT / context / dockerfile).resolve() == DOCKERFILE


def test_simulator_drives_the_same_broker_and_topics(compose):
    _, simulator = service_running(compose, "simulate")
    argv = command(simulator)
    assert argv[:2] == ["genco", "simulate"]
    env = environment(simulator)
    broker = argv[argv.index("--broker") + 1] if "--broker" in argv else env.get("GENCO_BROKER", "")
    prefix = env.get("GENCO_TOPIC_PREFIX", "genco.")
    for name, genco in serve_services(compose).items():
        assert broker_addresses(broker) == broker_addresses(environment(genco)["GENCO_BROKER"]), name
        assert prefix == environment(genco).get("GENCO_TOPIC_PREFIX", "genco."), f"the simulator and {name} differ"
        same_image = simulator.get("image") and simulator.get("image") == genco.get("image")
        assert same_image or simulator.get("build") == genco.get("build"), "the simulator must run the genco image"
    if "--rate" in argv:
        assert float(argv[argv.index("--rate") + 1]) > 0
    assert set(depends_on(simulator)) & set(serve_services(compose)), "the simulator starts after genco"


def test_genco_settings_are_ones_the_code_reads(compose):
    """A misspelt GENCO_* variable is silently ignored at run time: every one set must occur in the source."""
    includes = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    read = set()
    for pattern in includes["include"]:
        for package in ROOT.glob(pattern.rstrip("*") + "*"):
            for source in package.rglob("*.py") if package.is_dir() else []:
                read.update(re.findall(r"GENCO_[A-Z0-9_]+", source.read_text()))
    assert "GENCO_BROKER" in read, "found no GENCO_* setting in the package source"
    for name, service in compose["services"].items():
        env = environment(service)
        for key in env:
            if key.startswith("GENCO_"):
                assert key in read, f"{name} sets {key}, which no module reads"
        for key in ("GENCO_CLICK_WINDOW_S", "GENCO_EXPLORE", "GENCO_METRICS_PORT"):
            if key in env:
                float(env[key])  # a number once the ${...:-default} is resolved


# ---------------------------------------------------------------- Dockerfile and .dockerignore


def test_dockerfile_installs_the_pinned_cpu_torch_before_the_project(pyproject):
    pins = [d for d in pyproject["project"]["dependencies"] if re.match(r"torch\s*==", d)]
    assert len(pins) == 1, "pyproject should pin torch with =="
    version = pins[0].split("==", 1)[1].strip()
    runs = [args for keyword, args in dockerfile_instructions() if keyword == "RUN"]
    torch_runs = [i for i, run in enumerate(runs) if re.search(r"\btorch\b", run)]
    assert torch_runs, "the Dockerfile does not install torch"
    first = runs[torch_runs[0]]
    assert re.search(r"--(?:extra-)?index-url[ =]https://download\.pytorch\.org/whl/cpu\b", first), (
        "torch must come from the CPU index, or pip pulls the CUDA build"
    )
    assert re.search(rf"\btorch=={re.escape(version)}(?![\w.])", first), f"pin torch=={version} as pyproject does"
    project_runs = [i for i, run in enumerate(runs) if installs_project(run)]
    assert project_runs, "the Dockerfile never runs `pip install .`"
    assert torch_runs[0] < project_runs[0], "install the CPU torch before the project, or pip resolves a CUDA torch"


def test_dockerfile_base_python_satisfies_requires_python(pyproject):
    bases = [args for keyword, args in dockerfile_instructions() if keyword == "FROM"]
    match = re.fullmatch(r"python:(\d+\.\d+)(?:\.\d+)?-slim\S*", bases[-1].split()[0])
    assert match, f"base image {bases[-1]!r} is not python:X.Y-slim"
    assert match.group(1) in SpecifierSet(pyproject["project"]["requires-python"])


def test_image_runs_genco_as_a_user_that_owns_the_state_dir(compose):
    instructions = dockerfile_instructions()
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    assert ("WORKDIR", "/app") in instructions

    # compose's command replaces CMD but not ENTRYPOINT: the two together must be `genco serve`.
    entrypoint = [exec_form(args) for keyword, args in instructions if keyword == "ENTRYPOINT"]
    cmd = [exec_form(args) for keyword, args in instructions if keyword == "CMD"]
    prefix = entrypoint[-1] if entrypoint else []
    assert [*prefix, *(cmd[-1] if cmd else [])][:2] == ["genco", "serve"], "the image's default is not genco serve"
    services = serve_services(compose)
    for name, genco in services.items():
        assert [*prefix, *command(genco)][:2] == ["genco", "serve"], f"{name}: ENTRYPOINT and command are not serve"

    # A fresh named volume copies the image's folder, owner included: the user must own it.
    (state_dir,) = {environment(genco)["GENCO_STATE_DIR"] for genco in services.values()}
    user_at = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "USER")
    chowned = [
        args for keyword, args in instructions[:user_at] if keyword == "RUN" and "chown" in args and state_dir in args
    ]
    assert chowned, f"{state_dir} is not chowned to the image's user before USER"


def test_dockerignore_keeps_local_state_out_and_sources_in(pyproject):
    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    for path in (".venv/bin/python", ".git/HEAD", "state-data/snapshots/1", "bench-out/run.json"):
        assert dockerignored(path, patterns), f"{path} would be sent to the build"
    assert dockerignored("genco/__pycache__/cli.cpython-311.pyc", patterns)

    # `COPY . .` then `pip install .` needs the project files.
    needed = ["pyproject.toml", pyproject["project"].get("readme", "README.md")]
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        needed += [str(p.relative_to(ROOT)) for p in ROOT.glob(pattern.rstrip("*") + "*/__init__.py")]
    assert len(needed) > 2
    for path in needed:
        assert not dockerignored(path, patterns), f".dockerignore leaves {path} out of the image"


# ---------------------------------------------------------------- external validators, where present


def compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_cli_accepts_the_file():
    cli = compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed; the YAML checks above still ran")
    result = subprocess.run(
        [*cli, "--project-directory", str(ROOT), "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        # docker-compose 1.x is a Python program: keep this interpreter's paths out of it.
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")},
    )
    assert result.returncode == 0, f"{' '.join(cli)} config rejects the file:\n{result.stderr}"


def compose_schema() -> Path | None:
    """The compose-spec JSON schema as some local install ships it (docker-compose 1.x does)."""
    roots = [Path(p) for p in sys.path if p] + [Path("/usr/lib/python3/dist-packages")]
    for root in roots:
        candidate = root / "compose" / "config" / "compose_spec.json"
        if candidate.is_file():
            return candidate
    return None


def test_compose_file_matches_the_compose_spec_schema(compose):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed")
    schema_path = compose_schema()
    if schema_path is None:
        pytest.skip("no copy of the compose-spec schema on this machine (tests download nothing)")
    schema = json.loads(schema_path.read_text())
    # Pick the draft by name: older copies spell $schema in ways jsonschema no longer recognises.
    drafts = {"2020-12": "Draft202012Validator", "2019-09": "Draft201909Validator", "draft-07": "Draft7Validator"}
    draft = next((cls for tag, cls in drafts.items() if tag in schema.get("$schema", "")), "Draft7Validator")
    validator = getattr(jsonschema, draft)(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


# ---------------------------------------------------------------- security, limits and health (issue 20)


def test_host_ports_are_published_on_loopback_only(compose):
    for name, service in compose["services"].items():
        for address in published_host_addresses(service):
            assert address in ("127.0.0.1", "[::1]", "::1"), (
                f"{name} publishes a port on {address or 'every host interface'}: Kafka's listener is "
                "unauthenticated plaintext and the metrics are not for the network"
            )


def test_kafka_accepts_the_largest_message_genco_reads_and_writes(compose):
    from stream.kafka import MAX_MESSAGE_BYTES

    _, kafka = kafka_service(compose)
    limit = environment(kafka).get("KAFKA_MESSAGE_MAX_BYTES")
    assert limit and int(limit) >= MAX_MESSAGE_BYTES, "Kafka's ~1 MiB default refuses values genco must carry"


def healthcheck_argv(test: object) -> list[str]:
    argv = test if isinstance(test, list) else ["CMD-SHELL", str(test)]
    return argv[1:] if argv[0] == "CMD" else shlex.split(" ".join(argv[1:]))


def test_healthchecks_run_genco_status_which_fails_on_a_crash_loop(compose):
    for name, genco in serve_services(compose).items():
        assert healthcheck_argv(genco["healthcheck"]["test"])[:2] == ["genco", "status"], (
            f"{name}: the healthcheck must fail while an agent crash-loops: probing the metrics port stays green"
        )
    checks = [args for keyword, args in dockerfile_instructions() if keyword == "HEALTHCHECK"]
    assert checks, "the image has no HEALTHCHECK"
    assert re.search(r"CMD\s+\[\s*\"genco\",\s*\"status\"", checks[-1]), checks[-1]


def test_secrets_stay_out_of_the_image_and_installs_follow_the_constraints():
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in (".env", ".env.production", "certs/client.key"):
        assert dockerignored(path, patterns), f"{path} would be copied into the image"
    runs = [args for keyword, args in dockerfile_instructions() if keyword == "RUN"]
    installs = [run for run in runs if "pip install" in run and "download.pytorch.org" not in run]
    assert installs and all("-c constraints.txt" in run for run in installs), "install what CI tested"
    assert (ROOT / "constraints.txt").is_file()
