"""The deployment files, checked as far as a machine without Docker, cloud or Kubernetes allows.

cluster.yaml goes through Ray's own config preparation and schema; the Dockerfile, the compose
stack and the KubeRay manifests are parsed and held to the security rules of the cluster issue
(token auth, loopback by default, no credential in any file); the runbook's commands are parsed
by the real `chestxpert` and `ray` command-line parsers.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import REPO

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
CLUSTER_YAML = REPO / "cluster.yaml"
COMPOSE = REPO / "cluster" / "compose.yaml"
ENV_EXAMPLE = REPO / "cluster" / ".env.example"
RAYCLUSTER = REPO / "cluster" / "kuberay" / "raycluster.yaml"
RAYJOB = REPO / "cluster" / "kuberay" / "rayjob.yaml"
RUNBOOK = REPO / "cluster" / "README.md"
DEPLOY_FILES = [
    DOCKERFILE,
    DOCKERIGNORE,
    CLUSTER_YAML,
    COMPOSE,
    ENV_EXAMPLE,
    RAYCLUSTER,
    RAYJOB,
    RUNBOOK,
]
GPU_SPECS = sorted((REPO / "sweeps" / "examples").glob("*-gpu.yaml"))
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|_KEY$", re.IGNORECASE)


def pyproject_requirement(name: str) -> Requirement:
    """The dependency `name` as pyproject.toml declares it."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(req for req in map(Requirement, deps) if req.name == name)


# ---------------------------------------------------------------- secrets in any deployment file


def secrets_in(text: str) -> list[str]:
    """Credential-looking strings: AWS key ids, literal AWS secret keys, private keys."""
    found = re.findall(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b", text)
    for match in re.finditer(
        r"aws_secret_access_key\s*[:=]\s*[\"']?([^\s\"']+)", text, re.IGNORECASE
    ):
        if not match.group(1).startswith("${"):
            found.append(match.group(0))
    found += re.findall(r"-----BEGIN [A-Z ]*PRIVATE KEY-----", text)
    return found


@pytest.mark.parametrize(
    "planted",
    [
        "image: x\nkey: AKIA" + "Q" * 16 + "\n",
        "[default]\naws_secret_access_key = " + "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "EXAMPLEKEY\n",
        "AWS_SECRET_ACCESS_KEY: " + "abcdEFGH1234" * 3 + "\n",
        "-----BEGIN OPENSSH " + "PRIVATE KEY-----\n",
    ],
)
def test_the_secret_scan_finds_planted_credentials(planted: str) -> None:
    assert secrets_in(planted)


def test_the_secret_scan_accepts_references() -> None:
    assert secrets_in("AWS_SECRET_ACCESS_KEY: ${CHESTXPERT_S3_SECRET_KEY:?set it}\n") == []


@pytest.mark.parametrize("path", DEPLOY_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_deployment_file_holds_a_credential(path: Path) -> None:
    assert path.is_file(), f"{path} is missing"
    assert secrets_in(path.read_text()) == []


# ------------------------------------------------------------------------------------ Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in dockerfile_instructions():
        if keyword == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def test_dockerfile_base_is_the_tensorflow_gpu_image_pyproject_allows() -> None:
    froms = [args for keyword, args in dockerfile_instructions() if keyword == "FROM"]
    assert len(froms) == 1, froms
    match = re.fullmatch(r"tensorflow/tensorflow:(\d+\.\d+\.\d+)-gpu", froms[0])
    assert match, f"FROM {froms[0]}: expected tensorflow/tensorflow:X.Y.Z-gpu"
    spec = pyproject_requirement("tensorflow").specifier
    assert Version(match.group(1)) in spec, (
        f"base TensorFlow {match.group(1)} is outside pyproject's {spec}"
    )


def test_dockerfile_installs_the_project_with_exactly_the_pinned_ray() -> None:
    runs = " ".join(args for keyword, args in dockerfile_instructions() if keyword == "RUN")
    pins = re.findall(r"ray\[tune,default\]==([0-9.]+)", runs)
    assert pins, "the image must pin ray[tune,default]==X.Y.Z"
    pinned = Version(pins[0])
    assert pinned in pyproject_requirement("ray").specifier
    assert pinned == Version(importlib.metadata.version("ray")), (
        "the image's Ray differs from this virtualenv's"
    )
    install = re.search(r"pip install ([^&]*)", runs)
    assert install and " . " in f" {install.group(1)} " and "-e" not in install.group(1).split()


def dockerfile_created_user() -> tuple[str, str]:
    """(name, uid) of the user the image's `useradd` creates."""
    for keyword, args in dockerfile_instructions():
        if keyword == "RUN" and "useradd" in args:
            argv = shlex.split(re.split(r"&&|;|\|\|", args[args.index("useradd") :])[0])
            return argv[-1], argv[argv.index("--uid") + 1]
    raise AssertionError("the image creates no user")


def test_dockerfile_runs_as_the_non_root_user_1000() -> None:
    name, uid = dockerfile_created_user()
    assert (name, uid) == ("ray", "1000")
    instructions = dockerfile_instructions()
    users = [args for keyword, args in instructions if keyword == "USER"]
    # The last USER wins; numeric (uid:gid) so that Kubernetes' runAsNonRoot can verify it.
    assert users and users[-1].split(":")[0] in (uid, name), users
    workdirs = [args for keyword, args in instructions if keyword == "WORKDIR"]
    assert workdirs[-1] == f"/home/{name}/chestxpert"


def test_dockerfile_environment_keeps_token_auth_and_quiet_defaults() -> None:
    env = dockerfile_env()
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["TF_CPP_MIN_LOG_LEVEL"] == "2"
    # The cluster launcher places file_mounts under the image's HOME; the token path must be
    # exactly where cluster.yaml puts the token.
    assert env["HOME"] == "/home/ray"
    mounted = [
        remote for remote in load_cluster_yaml()["file_mounts"] if remote.endswith("auth_token")
    ]
    assert [remote.replace("~", env["HOME"], 1) for remote in mounted] == [
        env["RAY_AUTH_TOKEN_PATH"]
    ]
    names = [
        item.partition("=")[0]
        for keyword, args in dockerfile_instructions()
        if keyword in ("ENV", "ARG")
        for item in shlex.split(args)
    ]
    baked = [name for name in names if SECRET_NAME.search(name) and name != "RAY_AUTH_TOKEN_PATH"]
    assert baked == [], f"no credential may be baked into the image: {baked}"


def dockerignore_excludes(path: str) -> bool:
    """Whether Docker leaves `path` out of the build context (patterns as Go's filepath.Match,
    `**` for any depth, the last matching pattern wins, an excluded folder takes its contents)."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                token, re.escape(token)
            )
        rules.append((re.compile(regex), negate))
    parts = path.split("/")
    for depth in range(1, len(parts) + 1):
        prefix, excluded = "/".join(parts[:depth]), False
        for regex, negate in rules:
            if regex.fullmatch(prefix):
                excluded = not negate
        if excluded:
            return True
    return False


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".chestxpert/ray_auth_token",
        ".git/HEAD",
        ".env",
        "cluster/.env",
        "cluster/.env.example",
        "data/nih/images_001/x.png",
        "mlruns/0/meta.yaml",
        "shards/train-0.parquet",
        "tests/fixtures/nih_sample/images/a.png",
        "cluster/__pycache__/cli.cpython-311.pyc",
        ".pytest_cache/v/cache",
        ".ruff_cache/x",
        "models/best/model.keras",
        "chestxpert.egg-info/PKG-INFO",
    ],
)
def test_dockerignore_keeps_out(path: str) -> None:
    assert dockerignore_excludes(path)


@pytest.mark.parametrize(
    "path",
    [
        "pyproject.toml",
        "README.md",
        "LICENSE.md",
        "chestxpert/cli.py",
        "cluster/endpoints.py",
        "datasets/nih_label_rates.json",
        "sweeps/examples/nih-densenet121-gpu.yaml",
        "trainable/train.py",
        "results/report.py",
    ],
)
def test_dockerignore_keeps_what_pip_install_needs(path: str) -> None:
    assert (REPO / path).exists()
    assert not dockerignore_excludes(path)


# ---------------------------------------------------------------------------------- cluster.yaml


def load_cluster_yaml() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_validate(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does to a config before it asks AWS anything: merge Ray's AWS defaults,
    then check it against ray-schema.json and Ray's own rules. Returns the prepared config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_rays_own_validation() -> None:
    prepared = ray_validate(load_cluster_yaml())
    assert prepared["cluster_name"] == "chestxpert"
    assert prepared["provider"] == {
        "type": "aws",
        "region": "us-east-1",
        "cache_stopped_nodes": False,
    }


HEAD, WORKER = "ray.head.cpu", "ray.worker.gpu"
BREAKAGES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "unknown top-level key": lambda c: c.update(dashboard_host="0.0.0.0"),
    "unknown docker key": lambda c: c["docker"].update(env={"MLFLOW_TRACKING_URI": "x"}),
    "GPU count as text": lambda c: c["available_node_types"][WORKER]["resources"].update(GPU="1"),
    "negative CPU count": lambda c: c["available_node_types"][WORKER]["resources"].update(CPU=-8),
    "min_workers as text": lambda c: c["available_node_types"][WORKER].update(min_workers="0"),
    "node type without node_config": lambda c: c["available_node_types"][HEAD].pop("node_config"),
    "per-type docker run_options": lambda c: c["available_node_types"][WORKER].update(
        docker={"run_options": []}
    ),
    "head type that does not exist": lambda c: c.update(head_node_type="ray.head.missing"),
    "max_workers as text": lambda c: c.update(max_workers="eight"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_a_broken_cluster_yaml_is_rejected(breakage: str) -> None:
    config = load_cluster_yaml()
    BREAKAGES[breakage](config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_validate(config)


def ray_cli_context(argv: list[str]) -> Any:
    """Parse `ray ARGV...` with Ray's own click commands (nothing runs); return the context."""
    from ray.scripts.scripts import cli

    command = cli.commands[argv[0]]
    return command.make_context(argv[0], list(argv[1:]))


def ray_start_params(command_line: str) -> dict[str, Any]:
    """The parsed options of the `ray start` in a start command (`ulimit ...; ray start ...`)."""
    segments = [s.strip() for s in command_line.split(";") if s.strip().startswith("ray start")]
    assert len(segments) == 1, command_line
    return ray_cli_context(shlex.split(segments[0])[1:]).params


def test_the_head_starts_ray_with_the_dashboard_on_loopback_and_no_gpu() -> None:
    commands = load_cluster_yaml()["head_start_ray_commands"]
    assert commands[0] == "ray stop"
    params = ray_start_params(commands[1])
    assert params["head"] and params["port"] == 6379
    assert params["dashboard_host"] == "127.0.0.1"
    assert params["num_gpus"] == 0
    assert params["disable_usage_stats"]
    assert params["autoscaling_config"] == "~/ray_bootstrap_config.yaml"


def test_workers_join_the_head_without_usage_stats() -> None:
    commands = load_cluster_yaml()["worker_start_ray_commands"]
    assert commands[0] == "ray stop"
    params = ray_start_params(commands[1])
    assert params["address"] == "$RAY_HEAD_IP:6379" and not params["head"]
    assert params["disable_usage_stats"]


def test_cluster_yaml_nodes_use_the_image_token_and_instance_profiles() -> None:
    config = load_cluster_yaml()
    prepared = ray_validate(config)
    docker = config["docker"]
    assert docker["container_name"] and "chestxpert" in docker["image"]
    assert "--env RAY_AUTH_MODE=token" in docker["run_options"]
    env = dict(
        option.split(" ", 1)[1].split("=", 1)
        for option in docker["run_options"]
        if option.startswith("--env ")
    )
    assert urlparse(env["MLFLOW_TRACKING_URI"]).scheme in ("http", "https")
    assert env["CHESTXPERT_STORAGE"].startswith("s3://")
    assert docker["worker_run_options"] == ["--gpus all"] and "head_run_options" not in docker
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for name, node_type in config["available_node_types"].items():
        arn = node_type["node_config"]["IamInstanceProfile"]["Arn"]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", arn), (name, arn)
    # The image has everything: Ray's AWS defaults (which pip-install another Ray) must not run.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert not any("pip" in command for command in prepared[key]), (key, prepared[key])
    # Ray's own security group opens only ssh to the world; a group of ours may not open more.
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        if any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", [])):
            assert rule["FromPort"] == rule["ToPort"] == 22, rule


def test_cluster_yaml_has_a_cpu_head_and_spot_gpu_workers() -> None:
    config = load_cluster_yaml()
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["GPU"] == 0 and head["resources"]["CPU"] > 0
    workers = [
        body
        for name, body in config["available_node_types"].items()
        if name != config["head_node_type"]
    ]
    assert len(workers) == 1
    worker = workers[0]
    assert worker["resources"]["GPU"] == 1
    assert (worker["min_workers"], worker["max_workers"]) == (0, 8) and config["max_workers"] >= 8
    assert worker["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert worker["node_config"]["InstanceType"].startswith("g5.")


def kuberay_gpu_groups() -> list[dict[str, Any]]:
    groups = []
    for doc in kuberay_docs(RAYCLUSTER) + kuberay_docs(RAYJOB):
        spec = ray_cluster_spec(doc)
        if spec:
            groups += spec["workerGroupSpecs"]
    return groups


@pytest.mark.parametrize("spec_path", GPU_SPECS, ids=lambda p: p.name)
def test_every_gpu_example_trial_fits_a_gpu_worker(spec_path: Path) -> None:
    wanted = yaml.safe_load(spec_path.read_text())["resources"]
    config = load_cluster_yaml()
    worker = next(
        body for body in config["available_node_types"].values() if body["resources"].get("GPU")
    )
    assert (
        wanted["cpus"] <= worker["resources"]["CPU"]
        and wanted["gpus"] <= worker["resources"]["GPU"]
    )
    for group in kuberay_gpu_groups():
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert wanted["cpus"] <= int(group["rayStartParams"]["num-cpus"])
        assert wanted["gpus"] <= int(limits["nvidia.com/gpu"])


def test_there_are_gpu_example_specs() -> None:
    assert GPU_SPECS, "sweeps/examples/*-gpu.yaml: the cluster files are sized for them"


# ---------------------------------------------------------------------------------- compose.yaml

_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $$."""

    def substitute(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        value = env.get(name)
        if op in (":?", "?") and (value is None or (op == ":?" and not value)):
            raise KeyError(f"{name}: {arg}")
        if op == ":-":
            return value or arg
        if op == "-":
            return arg if value is None else value
        return value or ""

    return _VARIABLE.sub(substitute, value.replace("$$", "\0")).replace("\0", "$")


def env_example() -> dict[str, str]:
    pairs = [
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    return {key.strip(): value.strip() for key, value in pairs}


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def walk_strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for value in node.values():
            yield from walk_strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk_strings(value)
    elif isinstance(node, str):
        yield node


def test_compose_has_the_four_services() -> None:
    services = load_compose()["services"]
    assert set(services) == {"postgres", "minio", "minio-init", "mlflow"}
    assert services["postgres"]["image"].startswith("postgres:16")


@pytest.mark.parametrize("env", [{}, env_example()], ids=["unset", ".env.example"])
def test_every_published_port_is_on_loopback_by_default(env: dict[str, str]) -> None:
    published = []
    for name, service in load_compose()["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str), f"{name}: write ports as HOST_IP:HOST_PORT:CONTAINER_PORT"
            parts = interpolate(port, env).split(":")
            assert len(parts) == 3 and parts[0] == "127.0.0.1", (
                f"{name} publishes {port} beyond loopback"
            )
            published.append((name, int(parts[2])))
    assert ("mlflow", 5000) in published
    assert "ports" not in load_compose()["services"]["postgres"]


def test_compose_reads_every_secret_from_the_env_file() -> None:
    services = load_compose()["services"]
    for name, service in services.items():
        for key, value in environment(service).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]+\}", value), (
                    f"{name}.{key} must be ${{VAR:?…}}"
                )
    for text in walk_strings(load_compose()):
        for userinfo in re.findall(r"//([^@/\s]*)@", text):
            assert re.fullmatch(r"(?:\$\{[^}]+\}|:)+", userinfo), f"a literal login in {text!r}"
        bare = _VARIABLE.sub("", text)
        assert not re.search(r"(?i)password\s*[:=]\s*\S", bare), f"a literal password in {text!r}"


def test_every_compose_variable_is_in_env_example_with_placeholders() -> None:
    text, example = COMPOSE.read_text().replace("$$", ""), env_example()
    referenced = {m["name"]: m["op"] for m in _VARIABLE.finditer(text)}
    missing = sorted(set(referenced) - set(example))
    assert missing == [], f"cluster/.env.example does not document {missing}"
    for name, op in referenced.items():
        if op == ":?":
            assert example[name], f"{name} is required by compose.yaml but empty in .env.example"
        if "PASSWORD" in name or "SECRET" in name:
            assert "change-me" in example[name], f"{name} in .env.example must be a placeholder"
    # The servers refuse shorter ones: MLflow passwords need 12 characters, MinIO's 8.
    assert len(example["MLFLOW_ADMIN_PASSWORD"]) >= 12
    assert (
        len(example["MINIO_ROOT_PASSWORD"]) >= 8 and len(example["CHESTXPERT_S3_SECRET_KEY"]) >= 8
    )


def test_mlflow_runs_with_basic_auth_a_postgres_store_and_minio_artifacts() -> None:
    services = load_compose()["services"]
    mlflow = services["mlflow"]
    command = mlflow["command"]
    assert command[:2] == ["mlflow", "server"]
    assert command[command.index("--app-name") + 1] == "basic-auth"
    destination = urlparse(command[command.index("--artifacts-destination") + 1])
    env = {key: interpolate(value, env_example()) for key, value in environment(mlflow).items()}
    store = urlparse(env["MLFLOW_BACKEND_STORE_URI"])
    assert (
        store.scheme.startswith("postgresql")
        and store.hostname == "postgres"
        and store.port == 5432
    )
    assert store.path == "/" + env_example()["POSTGRES_DB"]
    assert urlparse(env["MLFLOW_S3_ENDPOINT_URL"]).hostname == "minio"
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == env_example()["MLFLOW_ADMIN_PASSWORD"]
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    # The bucket MLflow writes to is the one minio-init creates.
    init = " ".join(services["minio-init"]["command"])
    assert (
        destination.scheme == "s3" and f"mc mb --ignore-existing local/{destination.netloc}" in init
    )
    assert mlflow["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "minio-init": {"condition": "service_completed_successfully"},
    }
    # The server is the clients' MLflow minor version.
    # With the `auth` extra: --app-name basic-auth refuses to start without Flask-WTF.
    install = re.search(r"mlflow\[([^\]]*)\]==([0-9.]+)", mlflow["build"]["dockerfile_inline"])
    assert install and "auth" in install.group(1).split(","), "install mlflow[auth]==X.Y.Z"
    pinned = Version(install.group(2))
    assert pinned in pyproject_requirement("mlflow").specifier
    assert pinned.release[:2] == Version(importlib.metadata.version("mlflow")).release[:2]
    assert "USER mlflow" in mlflow["build"]["dockerfile_inline"]


def test_mlflow_auth_config_is_read_by_mlflow_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # config.py by itself: the package would import the auth app, which needs Flask-WTF,
    # an extra the server image installs and this virtualenv does not.
    import mlflow

    source = Path(mlflow.__file__).parent / "server" / "auth" / "config.py"
    module_spec = importlib.util.spec_from_file_location("mlflow_auth_config", source)
    assert module_spec and module_spec.loader
    auth_config = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(auth_config)

    mlflow = load_compose()["services"]["mlflow"]
    written = re.search(r"printf '([^']*)' > (\S+)", mlflow["build"]["dockerfile_inline"])
    assert written and written.group(2) == environment(mlflow)["MLFLOW_AUTH_CONFIG_PATH"]
    ini = tmp_path / "basic_auth.ini"
    ini.write_text(written.group(1).replace("\\n", "\n"))
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", env_example()["MLFLOW_ADMIN_PASSWORD"])
    config = auth_config.read_auth_config()
    # The user store lives on the mlflow-auth volume, the admin password comes from the env file.
    store = Path(config.database_uri.removeprefix("sqlite:///"))
    mounts = dict(volume.split(":", 1) for volume in mlflow["volumes"])
    assert str(store.parent) == mounts["mlflow-auth"]
    assert config.admin_password == env_example()["MLFLOW_ADMIN_PASSWORD"]
    assert config.authorization_function.endswith("authenticate_request_basic_auth")


def test_every_long_running_service_has_a_health_check() -> None:
    for name, service in load_compose()["services"].items():
        if service.get("restart") == "no":
            continue
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no health check"


def test_git_ignores_the_env_file_but_not_its_example() -> None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git work tree")
    ignored = subprocess.run(["git", "check-ignore", "-q", "cluster/.env"], cwd=REPO)
    example = subprocess.run(["git", "check-ignore", "-q", "cluster/.env.example"], cwd=REPO)
    assert (ignored.returncode, example.returncode) == (0, 1)


def test_docker_compose_accepts_the_file_with_the_example_env() -> None:
    docker = shutil.which("docker")
    probe = docker and subprocess.run(
        [docker, "compose", "version"], capture_output=True, text=True
    )
    if not probe or probe.returncode != 0:
        pytest.skip(
            "`docker compose` is not installed here; the file is checked by the tests above only"
        )
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


# -------------------------------------------------------------------------------------- KubeRay


def kuberay_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def ray_cluster_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] == "RayCluster":
        return doc["spec"]
    if doc["kind"] == "RayJob":
        return doc["spec"]["rayClusterSpec"]
    return None


def pod_specs(spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=["raycluster", "rayjob"])
def test_kuberay_manifest_runs_the_pinned_ray_with_token_auth_and_gpus(path: Path) -> None:
    docs = kuberay_docs(path)
    assert all(doc["apiVersion"] in ("v1", "ray.io/v1") for doc in docs)
    assert "Secret" not in {doc["kind"] for doc in docs}, (
        "Secrets are made with kubectl, never committed"
    )
    specs = [spec for spec in map(ray_cluster_spec, docs) if spec]
    assert len(specs) == 1
    spec = specs[0]
    assert spec["rayVersion"] == importlib.metadata.version("ray")
    assert Version(spec["rayVersion"]) in pyproject_requirement("ray").specifier
    assert spec["authOptions"]["mode"] == "token"
    image = load_cluster_yaml()["docker"]["image"]
    for pod in pod_specs(spec):
        assert (
            pod["securityContext"]["runAsNonRoot"] is True
            and pod["securityContext"]["runAsUser"] == 1000
        )
        assert pod["serviceAccountName"] == "chestxpert-ray"
        for container in pod["containers"]:
            assert container["image"] == image, "every node runs the same project image"
            assert {"configMapRef": {"name": "chestxpert-endpoints"}} in container["envFrom"]
            for variable in container.get("env", []):
                if SECRET_NAME.search(variable["name"]):
                    assert "value" not in variable and "secretKeyRef" in variable["valueFrom"], (
                        variable
                    )
    gpu_groups = spec["workerGroupSpecs"]
    assert (
        len(gpu_groups) == 1
        and gpu_groups[0]["minReplicas"] == 0
        and gpu_groups[0]["maxReplicas"] == 8
    )
    resources = gpu_groups[0]["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert (
        "nvidia.com/gpu" not in head["limits"]
        and spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    )


def test_kuberay_config_map_service_account_and_secrets_by_reference() -> None:
    docs = {doc["kind"]: doc for doc in kuberay_docs(RAYCLUSTER)}
    data = docs["ConfigMap"]["data"]
    assert urlparse(data["MLFLOW_TRACKING_URI"]).scheme in ("http", "https")
    assert data["CHESTXPERT_STORAGE"].startswith("s3://")
    assert not any(SECRET_NAME.search(key) for key in data), (
        "credentials do not belong in a ConfigMap"
    )
    role = docs["ServiceAccount"]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+", role)


def test_rayjob_runs_the_gpu_sweep_spec_from_the_image() -> None:
    from chestxpert.cli import build_parser

    job = kuberay_docs(RAYJOB)[0]
    assert job["kind"] == "RayJob" and job["spec"]["shutdownAfterJobFinishes"] is True
    entrypoint = job["spec"]["entrypoint"]
    assert "chestxpert sweep run sweeps/examples/nih-densenet121-gpu.yaml" in entrypoint
    workdir, _, command = entrypoint.partition(" && ")
    assert workdir == "cd " + next(
        args for keyword, args in dockerfile_instructions() if keyword == "WORKDIR"
    )
    argv = shlex.split(command)[1:]
    assert (REPO / argv[-1]).is_file()
    assert build_parser().parse_args(argv).sweep_command == "run"


# -------------------------------------------------------------------------------------- runbook

RUNBOOK_STEPS = [
    "docker build",
    "docker push",
    "ray get-auth-token --generate",
    "file_mounts",
    "docker compose -f cluster/compose.yaml",
    "ray up cluster.yaml",
    "ray dashboard cluster.yaml",
    "http://127.0.0.1:8265",
    "RAY_AUTH_MODE=token",
    "RAY_AUTH_TOKEN_PATH",
    "MLFLOW_TRACKING_URI",
    "CHESTXPERT_STORAGE",
    "chestxpert sweep submit sweeps/examples/nih-densenet121-gpu.yaml --address http://127.0.0.1:8265",
    "--follow",
    "chestxpert sweep status nih-densenet121-224 --storage s3://",
    "chestxpert final",
    "chestxpert pull-best nih-densenet121-224 --final --to models/",
    "chestxpert predict models:/",
    "@champion",
    "ray down cluster.yaml",
    "kubectl apply -f cluster/kuberay/raycluster.yaml",
    "kubectl apply -f cluster/kuberay/rayjob.yaml",
    "## What was tested here and what was not",
]


@pytest.mark.parametrize("step", RUNBOOK_STEPS)
def test_the_runbook_has_every_step(step: str) -> None:
    assert step in RUNBOOK.read_text()


def runbook_command_lines() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", RUNBOOK.read_text(), flags=re.DOTALL)
    return [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]


def test_every_runbook_command_parses_with_the_real_parsers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from chestxpert.cli import build_parser

    monkeypatch.chdir(REPO)  # `ray up cluster.yaml` checks that the file exists
    parsed: list[str] = []

    def check(argv: list[str]) -> None:
        if argv[0] == "chestxpert":
            try:
                build_parser().parse_args(argv[1:])
            except SystemExit as exit_:
                pytest.fail(f"`{shlex.join(argv)}` does not parse (exit {exit_.code})")
            parsed.append(" ".join(argv[1:3]))
        elif argv[0] == "ray":
            context = ray_cli_context(argv[1:])
            parsed.append(f"ray {argv[1]}")
            if argv[1] == "exec":
                check(shlex.split(context.params["cmd"]))

    for line in runbook_command_lines():
        if line.startswith(("chestxpert ", "ray ")):
            check(shlex.split(line, comments=True))
    for expected in [
        "sweep submit",
        "sweep status",
        "sweep resume",
        "final nih-densenet121-224",
        "pull-best nih-densenet121-224",
        "predict models:/chestxpert-nih-densenet121@champion",
        "ray up",
        "ray dashboard",
        "ray exec",
        "ray down",
        "ray get-auth-token",
    ]:
        assert expected in parsed, f"the runbook runs no `{expected}` ({parsed})"
