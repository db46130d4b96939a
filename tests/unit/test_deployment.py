"""Deployment files (docker-compose.yml, Procfile, Dockerfile, .dockerignore) against the code.

No Docker engine is needed: the compose file is parsed with PyYAML and every command it (or the
Procfile) runs is parsed by the real click group `cli.main:main`, so a renamed command or option,
a misspelt environment variable or a weakened Redis/Flower setting fails here.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import yaml

from cli.main import main as relay_cli
from shared.settings import Settings, documented_variables

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
PROCFILE = ROOT / "Procfile"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

RELAY_SERVICES = ("migrate", "web", "worker", "realtime", "beat", "flower")
REQUIRED_SERVICES = ("postgres", "redis") + RELAY_SERVICES
PROCESS_TYPES = ("release", "web", "worker", "realtime", "beat", "flower")
SETTING_PREFIXES = ("RELAY_", "OPTIMOVE_", "BONUS_", "SEND_", "FLOWER_", "DATABASE_", "REDIS_")
REQUIRED_SECRETS = ("RELAY_LISTENER_TOKENS", "RELAY_ADMIN_PASSWORD")
SETTINGS = {env for env, _default, _doc in documented_variables()}

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}, $VAR (compose/sh syntax)
_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def procfile() -> dict[str, str]:
    entries: dict[str, str] = {}
    for number, line in enumerate(PROCFILE.read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, sep, command = line.partition(":")
        assert sep and re.fullmatch(r"[a-z][a-z0-9_-]*", name), f"Procfile line {number}: {line!r}"
        assert name not in entries, f"Procfile: process type {name!r} twice"
        entries[name] = command.strip()
    return entries


class MissingVariable(Exception):
    pass


def interpolate(value: str, environ: dict[str, str]) -> str:
    """Resolve compose-style variable references the way `docker compose config` does."""
    def one(match: re.Match) -> str:
        name = match.group(1) or match.group(4)
        op, arg = match.group(2), match.group(3) or ""
        present = name in environ
        non_empty = present and environ[name] != ""
        if op in (":-", "-"):
            return environ[name] if (non_empty if op == ":-" else present) else arg
        if op in (":?", "?"):
            if not (non_empty if op == ":?" else present):
                raise MissingVariable(f"{name}: {arg}")
            return environ[name]
        return environ.get(name, "")
    return _REF.sub(one, value.replace("$$", "\0")).replace("\0", "$")


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def words_of(command, environ: dict[str, str]) -> list[str]:
    """The argv of a compose/Procfile command with variables replaced by representative values."""
    argv = shlex.split(command) if isinstance(command, str) else [str(w) for w in command]
    # An unset `$PORT` becomes "1": a valid value for both int and str options.
    return [interpolate(w, {**{m[0] or m[3]: "1" for m in _REF.findall(w)}, **environ}) for w in argv]


def resolve(argv: list[str]) -> tuple[click.Command, list[str], list[str]]:
    """Walk the click group along argv; return the leaf command, its path and its arguments."""
    assert argv and argv[0] == "relay", f"command must start with `relay`: {argv}"
    command: click.Command = relay_cli
    path, rest = ["relay"], argv[1:]
    while isinstance(command, click.Group):
        assert rest and not rest[0].startswith("-"), f"{' '.join(path)}: sub-command missing in {argv}"
        sub = command.get_command(click.Context(command), rest[0])
        assert sub is not None, f"`{' '.join(path)}` has no sub-command {rest[0]!r} (in {argv})"
        command, path, rest = sub, path + [rest[0]], rest[1:]
    return command, path, rest


def check_relay_command(argv: list[str]) -> click.Command:
    """Fail unless argv is a real `relay` command with real options that click accepts."""
    command, path, args = resolve(argv)
    known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    for word in args:
        if word.startswith("--"):
            option = word.split("=", 1)[0]
            assert option in known, f"`{' '.join(path)}` has no option {option} (has {sorted(known)})"
    try:  # the real parser: option values, types, missing arguments
        command.make_context(" ".join(path), list(args))
    except click.ClickException as exc:
        pytest.fail(f"`{' '.join(argv)}` is rejected by click: {exc.format_message()}")
    return command


# --- docker-compose.yml -----------------------------------------------------------------------

def test_compose_uses_the_compose_spec_and_has_every_service(compose, services):
    assert "version" not in compose, "the Compose specification has no `version:` key"
    missing = [name for name in REQUIRED_SERVICES if name not in services]
    assert not missing, f"docker-compose.yml lacks services {missing}"
    assert set(compose.get("volumes") or {}) >= {
        v.split(":", 1)[0] for name in ("postgres", "redis") for v in services[name]["volumes"]
    }, "named volumes of postgres/redis must be declared at the top level"


def test_stores(services):
    postgres, redis = services["postgres"], services["redis"]
    assert str(postgres["image"]).startswith("postgres:15")
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    assert str(redis["image"]).startswith("redis:7")
    assert redis.get("healthcheck", {}).get("test"), "redis needs a healthcheck"
    assert any(v.endswith(":/data") for v in redis["volumes"]), "redis AOF must live on a volume"


def test_redis_is_durable_and_never_evicts(services):
    words = shlex.split(services["redis"]["command"]) if isinstance(services["redis"]["command"], str) \
        else list(services["redis"]["command"])
    assert words[0] == "redis-server"
    pairs = {words[i]: words[i + 1] for i in range(1, len(words) - 1) if words[i].startswith("--")}
    assert pairs.get("--appendonly") == "yes", "Redis must use AOF (--appendonly yes)"
    assert pairs.get("--appendfsync") == "everysec"
    assert pairs.get("--maxmemory-policy") == "noeviction", "kombu keys must never be evicted"


@pytest.mark.parametrize("name", RELAY_SERVICES)
def test_relay_service_commands_are_real_cli_commands(services, name):
    service = services[name]
    assert "command" in service, f"{name}: no command (the image has no entrypoint)"
    argv = words_of(service["command"], {})
    check_relay_command(argv)
    assert service.get("image") or service.get("build"), f"{name}: no image or build"


def test_release_step_and_start_order(services):
    migrate = services["migrate"]
    assert resolve(words_of(migrate["command"], {}))[1] == ["relay", "db", "upgrade"]
    assert migrate.get("restart") == "no", "migrate runs once"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("web", "worker", "beat", "flower"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", f"{name} before migrate"
        assert deps["redis"]["condition"] == "service_healthy", f"{name} before a healthy redis"


def test_web(services):
    web = services["web"]
    command, _, args = resolve(words_of(web["command"], {}))
    params = command.make_context("relay web", list(args)).params
    assert params["bind"] == "0.0.0.0" and str(params["port"]) == "8000"
    assert any(str(p).endswith("8000:8000") for p in web["ports"]), "web must publish port 8000"
    assert "/readyz" in " ".join(web["healthcheck"]["test"]), "web healthcheck must probe /readyz"


def test_worker_scales_and_beat_is_single(services):
    assert "container_name" not in services["worker"], "a container_name prevents --scale worker=N"
    beat = services["beat"]
    command, _, args = resolve(words_of(beat["command"], {}))
    assert command.make_context("relay beat", list(args)).params["schedule_file"]
    assert (beat.get("deploy") or {}).get("replicas", 1) == 1, "exactly one beat"


def test_flower_is_loopback_only_and_authenticated(services):
    flower = services["flower"]
    for port in flower.get("ports", []):
        spec = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port.get('published')}:{port.get('target')}"
        assert spec.startswith("127.0.0.1:"), f"Flower published beyond loopback: {port!r}"
    assert flower.get("ports"), "Flower port should be published on 127.0.0.1"
    auth = env_of(flower).get("FLOWER_BASIC_AUTH", "")
    assert re.fullmatch(r"\$\{FLOWER_BASIC_AUTH:\?[^}]+\}", auth), \
        "FLOWER_BASIC_AUTH must be required (${FLOWER_BASIC_AUTH:?...})"
    with pytest.raises(MissingVariable):
        interpolate(auth, {})
    assert interpolate(auth, {"FLOWER_BASIC_AUTH": "ops:pw"}) == "ops:pw"


def test_every_environment_variable_is_a_real_setting(services):
    text = COMPOSE.read_text()
    names = {m[0] or m[3] for m in _REF.findall(text)}
    for service in services.values():
        names |= set(env_of(service))
    unknown = sorted(n for n in names if n.startswith(SETTING_PREFIXES) and n not in SETTINGS)
    assert not unknown, f"docker-compose.yml uses variables that are not settings: {unknown}"


def test_every_setting_reaches_the_relay_processes(services):
    for name in RELAY_SERVICES:
        missing = sorted(SETTINGS - set(env_of(services[name])) - {"FLOWER_BASIC_AUTH"})
        assert not missing, f"{name}: settings not passed through by docker-compose.yml: {missing}"


def test_required_secrets_and_passthrough(services):
    env = env_of(services["web"])
    for name in REQUIRED_SECRETS:
        assert re.fullmatch(rf"\$\{{{name}:\?[^}}]+\}}", env[name]), f"{name} must be ${{{name}:?message}}"
    assert "@postgres:" in env["DATABASE_URL"] and env["DATABASE_URL"].startswith("postgresql://")
    assert env["REDIS_URL"].startswith("redis://redis:")
    for name, value in env.items():
        if name not in (*REQUIRED_SECRETS, "DATABASE_URL", "REDIS_URL"):
            assert value == f"${{{name}:-}}", f"{name}: pass it through as ${{{name}:-}}, got {value!r}"


def test_compose_environment_loads_as_settings(services):
    """With only the required secrets exported, every relay process gets valid settings."""
    shell = {"RELAY_LISTENER_TOKENS": "a" * 32, "RELAY_ADMIN_PASSWORD": "pw", "FLOWER_BASIC_AUTH": "ops:pw"}
    for name in RELAY_SERVICES:
        env = {k: interpolate(v, shell) for k, v in env_of(services[name]).items()}
        settings = Settings.from_env(env).require("database_url", "redis_url", "listener_tokens")
        assert settings.optimove_api_url is None and settings.bonus_mode == "batch"  # empty = unset
    for secret in REQUIRED_SECRETS:
        with pytest.raises(MissingVariable):
            for value in env_of(services["web"]).values():
                interpolate(value, {k: v for k, v in shell.items() if k != secret})


# --- Procfile ---------------------------------------------------------------------------------

def test_procfile_process_types(procfile):
    missing = [name for name in PROCESS_TYPES if name not in procfile]
    assert not missing, f"Procfile lacks process types {missing}"


@pytest.mark.parametrize("name", PROCESS_TYPES)
def test_procfile_commands_are_real_cli_commands(procfile, name):
    check_relay_command(words_of(procfile[name], {}))


def test_procfile_roles(procfile):
    assert resolve(words_of(procfile["release"], {}))[1] == ["relay", "db", "upgrade"]
    for name in ("web", "worker", "beat", "flower"):
        assert resolve(words_of(procfile[name], {}))[1] == ["relay", name]
    assert "$PORT" in procfile["web"] or "${PORT" in procfile["web"], "web must listen on the platform's $PORT"
    names = {m[0] or m[3] for line in procfile.values() for m in _REF.findall(line)}
    unknown = sorted(n for n in names if n.startswith(SETTING_PREFIXES) and n not in SETTINGS
                     and n != "FLOWER_PORT")
    assert not unknown, f"Procfile uses variables that are not settings: {unknown}"


# --- Dockerfile -------------------------------------------------------------------------------

def test_dockerfile():
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()
             if line.strip() and not line.strip().startswith("#")]
    instructions = [line.split(None, 1)[0].upper() for line in lines]
    assert lines[0].split()[:2] == ["FROM", "python:3.11-slim"]
    assert "ENTRYPOINT" not in instructions, "commands come from compose/Procfile"
    assert any(re.search(r"pip install( [^\n]*)? \.(\s|$)", line) for line in lines), "`pip install .`"
    users = [line.split()[1] for line in lines if line.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    assert any(line.upper().startswith("EXPOSE") and "8000" in line.split() for line in lines)


def test_dockerignore_keeps_local_state_out():
    patterns = {line.strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    for required in (".git", ".venv", ".relay"):
        assert required in patterns, f".dockerignore must exclude {required}"
    for needed in ("pyproject.toml", "shared", "cli", "web", "workers", "simulator", "*"):
        assert needed not in patterns, f".dockerignore excludes {needed}, which `pip install .` needs"


def _queues(line: str) -> set[str]:
    command, path, args = resolve(words_of(line, {}))
    assert path == ["relay", "worker"], line
    return set(command.make_context("relay worker", list(args)).params["queues"].split(","))


def test_realtime_has_its_own_worker_and_the_others_take_the_rest(services, procfile):
    from shared.dispatch import CAMPAIGN_QUEUES, QUEUES, REALTIME

    for where, general, realtime in (("compose", services["worker"]["command"], services["realtime"]["command"]),
                                     ("Procfile", procfile["worker"], procfile["realtime"])):
        assert _queues(realtime) == {REALTIME}, where
        assert _queues(general) == set(CAMPAIGN_QUEUES), where
        assert _queues(general) | _queues(realtime) == set(QUEUES), where


def test_worker_without_queues_consumes_every_queue():
    from shared.dispatch import QUEUES

    assert _queues("relay worker") == set(QUEUES)
