"""Three replicas of the image behind a real nginx (`deploy/nginx.conf`): `make test-deploy`.

Needs rootful podman, the image (`DISTILL_IMAGE`) and nginx; the make target
prepares all three. Every replica and nginx listen on 127.0.0.1 only. The
replicas run as Kubernetes runs them: read-only root filesystem, writable
memory-backed directories for /tmp and the metrics, no capabilities.

The replicas share a Redis container (Debian's redis-server on the same base) as
their embedding cache. Run alone (`-s` prints the figures): the tests share the
replicas and run in file order (spread, the cache across replicas, rolling
restart, SIGKILL, no network).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import ROOT, SSEParser, free_port, parse_metrics, synthetic_texts

IMAGE = os.environ.get("DISTILL_IMAGE", "localhost/distill:test")
REDIS_IMAGE = os.environ.get("DISTILL_REDIS_IMAGE", "localhost/distill-redis:test")
REDIS_PORT = free_port()  # the replicas' shared embedding cache (a container on the host network)
REPLICAS = 3
PREFIX = f"distill-deploy-{os.getpid()}"
READY_TIMEOUT_S = 180  # a cold start on a busy 2-core machine
STOP_TIMEOUT_S = 70  # as terminationGracePeriodSeconds: SIGTERM, then SIGKILL after this


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=check, timeout=timeout)


def long_texts(n: int, seed: int) -> list[str]:
    """n distinct texts of ~1,500 characters, as retrievers send them."""
    texts = synthetic_texts(n * 12, seed=seed)
    return [" ".join(texts[i * 12 : (i + 1) * 12])[:1500] for i in range(n)]


def http_request(port: int, method: str, path: str, body: dict | None = None, timeout: float = 150):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, json.dumps(body) if body is not None else None, headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@dataclass
class Replica:
    """One container of the image, on 127.0.0.1:port (host network), one worker."""

    index: int
    port: int = field(default_factory=free_port)

    @property
    def name(self) -> str:
        return f"{PREFIX}-{self.index}"

    def run(self) -> None:
        podman(
            "run", "--detach", "--name", self.name, "--network", "host",
            "--read-only", "--tmpfs", "/run/distill:rw,mode=1777,size=64m",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--env", "HOST=127.0.0.1", "--env", f"PORT={self.port}", "--env", "WEB_CONCURRENCY=1",
            "--env", "PROMETHEUS_MULTIPROC_DIR=/run/distill/metrics",
            "--env", f"DISTILL_CACHE_URL=redis://127.0.0.1:{REDIS_PORT}/0",
            IMAGE,
        )

    def wait_ready(self) -> float:
        started = time.monotonic()
        while time.monotonic() - started < READY_TIMEOUT_S:
            try:
                if http_request(self.port, "GET", "/health", timeout=5)[0] == 200:
                    return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{self.name} not ready: {self.logs()}")

    def terminate(self) -> float:
        """SIGTERM (the image's STOPSIGNAL) and wait for the exit, as the kubelet does."""
        started = time.monotonic()
        podman("stop", "--time", str(STOP_TIMEOUT_S), self.name, timeout=STOP_TIMEOUT_S + 30)
        return time.monotonic() - started

    def start(self) -> None:
        podman("start", self.name)

    def kill(self) -> None:
        podman("kill", "--signal", "KILL", self.name)
        podman("wait", self.name, check=False)

    def remove(self) -> None:
        podman("rm", "--force", "--time", "0", self.name, check=False)

    def logs(self) -> str:
        return podman("logs", "--tail", "30", self.name, check=False).stdout

    def exit_code(self) -> int:
        return int(podman("inspect", "--format", "{{.State.ExitCode}}", self.name).stdout)

    def requests_served(self) -> Counter:
        """distill_requests_total by endpoint, from this replica's own /metrics."""
        status, body = http_request(self.port, "GET", "/metrics", timeout=10)
        assert status == 200
        served: Counter = Counter()
        for (name, labels), value in parse_metrics(body.decode()).items():
            if name == "distill_requests_total":
                served[dict(labels)["endpoint"]] += value
        return served

    def active_requests(self) -> float:
        status, body = http_request(self.port, "GET", "/metrics", timeout=10)
        assert status == 200
        return parse_metrics(body.decode()).get(("distill_active_requests", ()), 0.0)


class Balancer:
    """nginx running deploy/nginx.conf, its upstream pointed at the replicas."""

    def __init__(self, replicas: list[Replica], workdir: Path):
        self.port = free_port()
        self.workdir = workdir
        config = (ROOT / "deploy" / "nginx.conf").read_text()
        example = re.findall(r"(?m)^\s*server 10\.0\.0\.\d+:8080([^\n]*)\n", config)
        assert len(example) == 3, "the example's upstream lines changed: update this test"
        config = re.sub(r"(?m)^\s*server 10\.0\.0\.\d+:8080[^\n]*\n", "", config)
        servers = "".join(f"        server 127.0.0.1:{r.port}{example[0]}\n" for r in replicas)
        config = config.replace("        least_conn;\n", "        least_conn;\n" + servers)
        config = config.replace("listen 80;", f"listen 127.0.0.1:{self.port};")
        config = config.replace("/run/nginx-distill.pid", str(workdir / "nginx.pid"))
        config = config.replace("/var/log/nginx/", f"{workdir}/")
        temp = "".join(f"    {kind}_temp_path {workdir}/{kind};\n" for kind in ("client_body", "proxy"))
        config = config.replace("http {\n", "http {\n" + temp, 1)
        self.config = workdir / "nginx.conf"
        self.config.write_text(config)
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        subprocess.run(["nginx", "-t", "-q", "-e", "stderr", "-c", str(self.config)], check=True)
        self.process = subprocess.Popen(
            ["nginx", "-e", "stderr", "-c", str(self.config), "-g", "daemon off;"],
            stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            try:
                http_request(self.port, "GET", "/health", timeout=5)
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("nginx did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def complaints(self) -> str:
        """What went wrong on nginx's side, for the record (the work directory goes with
        the fixture): refused connections (each sent on to the next replica) counted,
        any other error and every answer that was not a 200 in full."""
        errors = [line for line in self._log("distill.error.log") if "[warn]" not in line]
        refused = [line for line in errors if "(111: Connection refused)" in line]
        others = [line for line in errors if line not in refused]
        failed = [line for line in self._log("distill.access.log") if '" 200 ' not in line]
        return "\n".join([
            f"nginx: {len(refused)} connections refused by a stopped replica and sent on",
            f"nginx: {len(others)} other errors", *others,
            f"nginx: {len(failed)} answers other than 200", *failed,
        ])

    def _log(self, name: str) -> list[str]:
        path = self.workdir / name
        return path.read_text().splitlines() if path.exists() else []

    def retried(self) -> int:
        """Requests that nginx sent on to another replica (the access log lists two statuses)."""
        text = "\n".join(self._log("distill.access.log"))
        return sum("," in statuses for statuses in re.findall(r"upstream_status=(.*)$", text, re.M))


@pytest.fixture(scope="module")
def cache_server():
    """Redis for the replicas' shared embedding cache, as a container of the same base."""
    name = f"{PREFIX}-redis"
    podman(
        "run", "--detach", "--name", name, "--network", "host", "--read-only",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        REDIS_IMAGE, "redis-server", "--bind", "127.0.0.1", "--port", str(REDIS_PORT),
        "--save", "", "--appendonly", "no", "--maxmemory", "256mb", "--maxmemory-policy", "allkeys-lru",
    )
    try:
        yield name
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


@pytest.fixture(scope="module")
def replicas(cache_server):
    started = [Replica(i) for i in range(REPLICAS)]
    try:
        for replica in started:
            replica.run()
        for replica in started:
            replica.wait_ready()
        yield started
    finally:
        for replica in started:
            replica.remove()


@pytest.fixture(scope="module")
def balancer(replicas):
    workdir = Path(tempfile.mkdtemp(prefix="distill-nginx-"))
    workdir.chmod(0o755)  # nginx's workers (not root) keep request bodies in here
    nginx = Balancer(replicas, workdir)
    nginx.start()
    yield nginx
    nginx.stop()
    print(nginx.complaints())
    shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class StreamOutcome:
    status: int
    ending: str  # "complete", "error", "cut" (ended without either) or "refused" (not 200)
    seconds: float = 0.0


SHED = Counter()  # 503 + Retry-After answers (every replica over its admission bound), retried


def post_honouring_retry_after(port: int, path: str, body: dict):
    """POST as a well-behaved client: a 503 with Retry-After is waited out and resent (5 tries)."""
    for _ in range(5):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=150)
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        retry_after = response.getheader("Retry-After")
        if response.status != 503 or retry_after is None:
            return conn, response
        response.read()
        conn.close()
        SHED[path] += 1
        time.sleep(min(float(retry_after), 2.0))
    return conn, response


def stream_through(port: int, texts: list[str]) -> StreamOutcome:
    """POST a stream through the balancer and read it to its end."""
    body = {"chunks": [{"id": str(i), "text": t} for i, t in enumerate(texts)]}
    conn = None
    try:
        conn, response = post_honouring_retry_after(port, "/v1/dedupe/stream", body)
        if response.status != 200:
            response.read()
            return StreamOutcome(response.status, "refused")
        parser = SSEParser()
        try:
            while line := response.readline():
                parser.feed(line.decode())
        except OSError:
            pass  # a connection reset mid-stream: judged below by the events received
        endings = [e.type for e in parser.events if e.type in ("complete", "error")]
        return StreamOutcome(200, endings[0] if len(endings) == 1 else "cut")
    except OSError:
        return StreamOutcome(0, "cut")
    finally:
        if conn is not None:
            conn.close()


def plain_through(port: int, texts: list[str]) -> int:
    """The status of a plain request through the balancer (-1: 200 with a wrong answer)."""
    body = {"chunks": [{"id": str(i), "text": t} for i, t in enumerate(texts)]}
    try:
        conn, response = post_honouring_retry_after(port, "/v1/dedupe", body)
        raw = response.read()
        conn.close()
    except OSError:
        return 0
    status = response.status
    return status if status != 200 or json.loads(raw)["stats"]["input_count"] == len(texts) else -1


def in_parallel(jobs, width: int) -> list:
    """Run callables on `width` threads; their results in order."""
    results: list = [None] * len(jobs)
    queue = list(enumerate(jobs))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if not queue:
                    return
                i, job = queue.pop()
            results[i] = job()

    threads = [threading.Thread(target=work) for _ in range(width)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_streams_and_requests_spread_over_every_replica(replicas, balancer):
    before = [r.requests_served() for r in replicas]
    jobs = [lambda i=i: plain_through(balancer.port, long_texts(4, seed=i)) for i in range(24)]
    jobs += [lambda i=i: stream_through(balancer.port, long_texts(6, seed=100 + i)) for i in range(12)]
    results = in_parallel(jobs, width=6)

    assert results[:24] == [200] * 24
    assert [o.ending for o in results[24:]] == ["complete"] * 12
    for replica, was in zip(replicas, before):
        grew = replica.requests_served() - was
        print(f"\ndeploy: replica {replica.index} served {dict(grew)}")
        assert grew["/v1/dedupe"] > 0 and grew["/v1/dedupe/stream"] > 0, replica.name


def cache_lookups(replica: Replica) -> Counter:
    """distill_embedding_cache_lookups_total by (layer, result), from the replica's /metrics."""
    status, body = http_request(replica.port, "GET", "/metrics", timeout=10)
    assert status == 200
    return Counter({
        (dict(labels)["layer"], dict(labels)["result"]): value
        for (name, labels), value in parse_metrics(body.decode()).items()
        if name == "distill_embedding_cache_lookups_total"
    })


def test_a_request_answered_cold_by_one_replica_is_answered_from_redis_by_another(replicas):
    first, second = replicas[1], replicas[2]
    body = {"chunks": [{"id": str(i), "text": t} for i, t in enumerate(long_texts(8, seed=77_000))]}
    before = cache_lookups(second)
    answers = []
    for replica in (first, second):
        status, raw = http_request(replica.port, "POST", "/v1/dedupe", body)
        assert status == 200, raw
        answer = json.loads(raw)
        answer["stats"].pop("latency_ms")
        answers.append(answer)
    grew = cache_lookups(second) - before
    print(f"\ndeploy: the second replica's lookups for a request the first embedded: {dict(grew)}")
    assert answers[0] == answers[1]
    assert grew["redis", "hit"] > 0 and grew["redis", "miss"] == 0  # nothing left for its model


class StreamLoad:
    """Clients that open streams through the balancer back to back until stopped."""

    def __init__(self, port: int, clients: int, texts_per_stream: int):
        self.port, self.texts = port, texts_per_stream
        self.outcomes: list[StreamOutcome] = []
        self.plain: list[int] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._stream, args=(i,)) for i in range(clients)]
        self.threads.append(threading.Thread(target=self._plain))

    def _stream(self, client: int) -> None:
        n = 0
        while not self.stopping.is_set():
            started = time.monotonic()
            outcome = stream_through(self.port, long_texts(self.texts, seed=client * 10_000 + n))
            outcome.seconds = time.monotonic() - started
            self.outcomes.append(outcome)
            n += 1

    def _plain(self) -> None:
        n = 0
        while not self.stopping.is_set():
            self.plain.append(plain_through(self.port, long_texts(3, seed=900_000 + n)))
            n += 1

    def __enter__(self) -> "StreamLoad":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join()


def wait_for_streams_in_flight(replica: Replica, timeout: float = 60) -> float:
    """Until the replica is serving at least one request (so SIGTERM finds work)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        active = replica.active_requests()
        if active >= 1:
            return active
        time.sleep(0.05)
    raise AssertionError(f"no request in flight on {replica.name}")


def test_rolling_restart_with_streams_in_flight_cuts_none(replicas, balancer):
    figures = []
    retried_before = balancer.retried()
    started = time.monotonic()
    with StreamLoad(balancer.port, clients=6, texts_per_stream=24) as load:
        for replica in replicas:
            in_flight = wait_for_streams_in_flight(replica)
            drained_s = replica.terminate()
            exit_code = replica.exit_code()
            replica.start()
            ready_s = replica.wait_ready()
            figures.append((replica.index, in_flight, drained_s, ready_s, exit_code))
    endings = Counter(o.ending for o in load.outcomes)
    plain = Counter(load.plain)
    seconds = sorted(o.seconds for o in load.outcomes)

    print(f"\ndeploy: rolling restart of {REPLICAS} replicas took {time.monotonic() - started:.1f} s")
    for index, in_flight, drained_s, ready_s, exit_code in figures:
        print(
            f"deploy: replica {index}: {in_flight:.0f} in flight at SIGTERM, drained and exited "
            f"({exit_code}) in {drained_s:.1f} s, ready again {ready_s:.1f} s after start"
        )
    print(
        f"deploy: streams {dict(endings)}, plain requests {dict(plain)}, "
        f"sent on to another replica by nginx: {balancer.retried() - retried_before}"
    )
    print(f"deploy: answered 503 + Retry-After and resent: {dict(SHED) or 0}")
    print(f"deploy: a stream lasted {seconds[len(seconds) // 2]:.1f} s (median), {seconds[-1]:.1f} s (longest)")
    assert endings["cut"] == 0 and endings["refused"] == 0, endings
    assert endings["error"] == 0, endings  # every stream here is far shorter than the 60 s drain
    assert endings["complete"] >= 3 * len(replicas)
    assert set(plain) == {200}, plain
    assert all(code == 0 for *_, code in figures), figures  # exited by itself, not killed at the deadline


def test_killed_replica_new_requests_succeed_through_the_others(replicas, balancer):
    dead, alive = replicas[0], replicas[1:]
    dead.kill()
    before = [r.requests_served() for r in alive]
    jobs = [lambda i=i: plain_through(balancer.port, long_texts(3, seed=5_000 + i)) for i in range(18)]
    jobs += [lambda i=i: stream_through(balancer.port, long_texts(6, seed=6_000 + i)) for i in range(6)]
    results = in_parallel(jobs, width=6)

    assert results[:18] == [200] * 18
    assert [o.ending for o in results[18:]] == ["complete"] * 6
    served = sum(sum((r.requests_served() - was).values()) for r, was in zip(alive, before))
    assert served >= len(jobs)
    dead.start()
    dead.wait_ready()


def worker_pids(replica: Replica) -> tuple[int, list[int]]:
    """The replica's gunicorn master and workers, as host process ids."""
    master = int(podman("inspect", "--format", "{{.State.Pid}}", replica.name).stdout)
    return master, [int(p) for p in Path(f"/proc/{master}/task/{master}/children").read_text().split()]


def rss_mb(pid: int, field_: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_ + ":"):
            return int(line.split()[1]) * 1024 / 1e6
    raise AssertionError(field_)


def test_worker_memory_fits_the_manifest(replicas):
    """Each worker's peak RSS, up to the worst request the default limits allow, fits its
    share of the Deployment's memory limit (what the README's memory figures come from)."""
    import base64

    import numpy as np
    import yaml

    replica = replicas[1]
    master, (worker,) = worker_pids(replica)
    rng = np.random.default_rng(0)
    wide = rng.standard_normal((2100, 1536)).astype(np.float32)
    narrow = rng.standard_normal((10_000, 384)).astype(np.float32)
    cases = {
        "100 texts of 1,500 chars": [{"id": str(i), "text": t} for i, t in enumerate(long_texts(100, seed=7))],
        "2,100 x 1,536 decimals (63 MiB)": [
            {"id": str(i), "text": "t", "embedding": row.tolist()} for i, row in enumerate(wide)],
        "10,000 x 384 base64": [
            {"id": str(i), "text": "t", "embedding": base64.b64encode(row.tobytes()).decode()}
            for i, row in enumerate(narrow)],
    }
    print(
        f"\ndeploy: worker RSS at rest, after the tests above, {rss_mb(worker, 'VmRSS'):.0f} MB, "
        f"master {rss_mb(master, 'VmRSS'):.0f} MB"
    )
    peaks = []
    for name, chunks in cases.items():
        Path(f"/proc/{worker}/clear_refs").write_text("5")  # peak := current RSS
        status, _ = http_request(replica.port, "POST", "/v1/dedupe", {"chunks": chunks}, timeout=300)
        assert status == 200, name
        peaks.append(rss_mb(worker, "VmHWM"))
        print(f"deploy: worker peak RSS {peaks[-1]:.0f} MB after {name}")

    deployment = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    workers = int({e["name"]: e["value"] for e in container["env"]}["WEB_CONCURRENCY"])
    quantity = container["resources"]["limits"]["memory"]
    limit_mb = int(quantity[:-2]) * {"Mi": 2**20, "Gi": 2**30}[quantity[-2:]] / 1e6
    assert workers * max(peaks) + rss_mb(master, "VmRSS") <= limit_mb


def test_image_serves_with_no_network():
    """`--network none`: the self-check embeds, and the server answers from inside the container."""
    check = podman("run", "--rm", "--network", "none", "--read-only", IMAGE, "python", "deploy/selfcheck.py")
    assert "selfcheck ok" in check.stdout

    name = f"{PREFIX}-offline"
    podman("run", "--detach", "--name", name, "--network", "none", "--read-only", IMAGE)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while podman("healthcheck", "run", name, check=False).returncode != 0:  # the image's HEALTHCHECK
            assert time.monotonic() < deadline, podman("logs", name, check=False).stdout
            time.sleep(0.5)
        ask = (
            "import json, urllib.request; texts = ['The cat sat on the mat.', 'The cat sat on the mat!', "
            "'Tariffs rose in winter.']; body = json.dumps({'chunks': [{'id': str(i), 'text': t} "
            "for i, t in enumerate(texts)]}).encode(); "
            "print(urllib.request.urlopen('http://127.0.0.1:8080/v1/dedupe', body, timeout=60).read().decode())"
        )
        answer = json.loads(podman("exec", name, "python", "-c", ask).stdout)
        assert [c["id"] for c in answer["chunks"]] == ["0", "2"]
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)
