"""The deployment files: Kubernetes manifests validate strictly, the Dockerfile lints clean,
and the numbers that must agree with the service (ports, probes, timeouts, paths) do."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.config import Config, load_config
from tests.support import ROOT

KUBERNETES = ROOT / "deploy" / "kubernetes"
MANIFESTS = sorted(p for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert path, f"{name} is missing: it comes with the test extra (pip install -e '.[test]')"
    return path


def manifest(kind: str) -> dict:
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == kind:
                return doc
    raise AssertionError(f"no {kind} in {KUBERNETES}")


def gunicorn_setting(name: str):
    """A literal assignment in gunicorn.conf.py, read without running the file."""
    tree = ast.parse((ROOT / "gunicorn.conf.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"gunicorn.conf.py sets no {name}")


def test_manifests_validate_strictly():
    run = subprocess.run([tool("kubernetes-validate"), "--strict", *map(str, MANIFESTS)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("passed") == len(MANIFESTS)


def test_the_validator_rejects_an_unknown_field(tmp_path):
    """--strict is what catches a misspelt field (Kubernetes would silently drop it)."""
    broken = tmp_path / "deployment.yaml"
    broken.write_text((KUBERNETES / "deployment.yaml").read_text().replace(
        "terminationGracePeriodSeconds:", "terminationGracePeriodSecond:"))
    run = subprocess.run([tool("kubernetes-validate"), "--strict", str(broken)], capture_output=True, text=True)
    assert run.returncode != 0 and "terminationGracePeriodSecond" in run.stdout + run.stderr


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in MANIFESTS]


def test_dockerfile_lints_clean():
    run = subprocess.run([tool("hadolint"), "--no-color", "--failure-threshold", "style",
                          str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout == "", run.stdout + run.stderr


def test_dockerfile_shape():
    lines = [l.strip() for l in (ROOT / "Dockerfile").read_text().splitlines()]
    instructions = [l for l in lines if l and not l.startswith("#")]
    assert instructions[0] == "ARG BASE=python:3.11-slim"
    assert all(l.startswith("FROM ${BASE}") for l in instructions if l.startswith("FROM"))
    user = [l for l in instructions if l.startswith("USER")][-1].split()[1]
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0"  # numeric: runAsNonRoot can check it
    assert "STOPSIGNAL SIGTERM" in instructions
    assert instructions[-1] == 'CMD ["gunicorn", "-c", "gunicorn.conf.py"]'
    healthcheck = " ".join(lines[lines.index(next(l for l in lines if l.startswith("HEALTHCHECK"))):][:2])
    assert 'CMD ["python"' in healthcheck and "/health" in healthcheck and "curl" not in healthcheck


def test_pod_runs_as_the_images_user_on_a_read_only_root():
    pod = manifest("Deployment")["spec"]["template"]["spec"]
    image_user = [l for l in (ROOT / "Dockerfile").read_text().splitlines() if l.startswith("USER")][-1]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert image_user.split()[1] == f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_writable_paths_are_empty_dirs():
    """gunicorn.conf.py deletes and recreates PROMETHEUS_MULTIPROC_DIR: it must lie inside a
    writable volume, not be the mount point itself; /tmp holds gunicorn's and the model's files."""
    pod = manifest("Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert set(mounts.values()) <= empty_dirs and "/tmp" in mounts
    env = {e["name"]: e["value"] for e in container["env"]}
    metrics_dir = Path(env["PROMETHEUS_MULTIPROC_DIR"])
    assert str(metrics_dir) not in mounts
    assert any(Path(m) in metrics_dir.parents for m in mounts)


def test_probes_and_shutdown_timing():
    pod = manifest("Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # The kubelet's grace period counts from before preStop: it must cover the
    # preStop pause, gunicorn's graceful timeout, and a margin.
    graceful = gunicorn_setting("graceful_timeout")
    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + graceful + 5


def test_ports_and_scrape_annotations_agree():
    deployment, service = manifest("Deployment"), manifest("Service")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    port = container["ports"][0]
    assert port["containerPort"] == 8080  # gunicorn.conf.py's default PORT
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    assert annotations["prometheus.io/path"] == "/metrics"
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]


def test_every_object_selects_the_deployments_pods():
    deployment = manifest("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert manifest("Service")["spec"]["selector"].items() <= labels.items()
    assert manifest("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = manifest("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert manifest("HorizontalPodAutoscaler")["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def mebibytes(quantity: str) -> int:
    """A Kubernetes memory quantity in Mi or Gi, as MiB."""
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()
    return int(number) * (1024 if unit == "Gi" else 1)


def test_memory_request_and_limit_hold_the_measured_workers():
    """Per worker ~560 MB warm, ~860 MB at the default limits' worst, up to 64 MB of
    embedding cache; the master ~90 MB (README, Deploy; `make test-deploy` measures them)."""
    container = manifest("Deployment")["spec"]["template"]["spec"]["containers"][0]
    workers = int({e["name"]: e["value"] for e in container["env"]}["WEB_CONCURRENCY"])
    mb = 1e6 / 2**20
    assert mebibytes(container["resources"]["requests"]["memory"]) >= (workers * 560 + 90) * mb
    assert mebibytes(container["resources"]["limits"]["memory"]) >= (workers * (860 + 64) + 90) * mb


class TestNginxExample:
    text = (ROOT / "deploy" / "nginx.conf").read_text()

    def directive(self, name: str, where: str | None = None) -> str:
        scope = self.text if where is None else self.text[self.text.index(where):]
        match = re.search(rf"^\s*{name}\s+([^;]*);", scope, re.M)
        assert match, f"no {name}"
        return match.group(1)

    def test_least_connections(self):
        upstream = self.text[self.text.index("upstream distill {"):]
        assert re.search(r"^\s*least_conn;", upstream[: upstream.index("}")], re.M)

    def test_no_replica_is_ever_marked_down(self):
        """A mark sticks until a request to that replica completes (seconds, for a stream):
        mid-rolling-restart every replica could be marked at once and nginx answer 502."""
        servers = re.findall(r"^[ \t]*server[ \t]+\S+([^;\n]*);", self.text, re.M)
        assert len(servers) == 3 and all("max_fails=0" in options.split() for options in servers)
        assert self.directive("zone", where="upstream distill {").split()[0] == "distill"

    def test_read_timeout_above_heartbeat_and_worker_timeout(self):
        read_timeout = int(self.directive("proxy_read_timeout").removesuffix("s"))
        assert read_timeout > Config().sse_heartbeat_s and read_timeout > gunicorn_setting("timeout")

    def test_refused_or_overloaded_goes_to_the_next_replica(self):
        assert {"error", "http_503", "non_idempotent"} <= set(self.directive("proxy_next_upstream").split())

    def test_stream_is_not_buffered(self):
        assert self.directive("proxy_buffering", where="location = /v1/dedupe/stream") == "off"

    def test_body_limit_matches_the_service(self):
        assert int(self.directive("client_max_body_size").removesuffix("m")) * 2**20 == Config().max_body_bytes

    @pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed (make test-deploy installs it)")
    def test_nginx_accepts_it(self, tmp_path):
        config = tmp_path / "nginx.conf"
        config.write_text(self.text.replace("/run/nginx-distill.pid", str(tmp_path / "pid"))
                          .replace("/var/log/nginx/", f"{tmp_path}/"))
        run = subprocess.run(["nginx", "-t", "-q", "-e", "stderr", "-c", str(config)],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr


def test_the_pods_disk_cache_fits_its_volume_twice():
    """The store and one damaged store set aside both fit the cache volume."""
    pod = manifest("Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == env["DISTILL_CACHE_DIR"])
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    size_limit = volume["emptyDir"]["sizeLimit"]
    assert "medium" not in volume["emptyDir"]  # on disk, not in the pod's memory
    assert int(size_limit.removesuffix("Mi")) >= 2 * int(env["DISTILL_CACHE_DISK_MB"])


def test_the_redis_overlay_points_every_replica_at_its_service():
    overlay = ROOT / "deploy" / "kubernetes-redis"
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    run = subprocess.run([tool("kubernetes-validate"), "--strict", str(overlay / "valkey.yaml")],
                         capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.count("passed") == 2, run.stdout + run.stderr
    assert kustomization["resources"] == ["../kubernetes", "valkey.yaml"]
    (patch,) = kustomization["patches"]
    (operation,) = yaml.safe_load(patch["patch"])
    url = operation["value"]["value"]
    assert operation["value"]["name"] == "DISTILL_CACHE_URL"
    assert load_config({"DISTILL_CACHE_URL": url}).cache_url == url
    service = next(d for d in yaml.safe_load_all((overlay / "valkey.yaml").read_text()) if d["kind"] == "Service")
    assert url == f"redis://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/0"
