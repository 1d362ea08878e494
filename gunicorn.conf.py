"""Production server: `gunicorn -c gunicorn.conf.py` alone starts the service.

The configuration is checked here, in the master, before any worker forks:
a bad value exits at once with one line naming the variable.
"""

import os
import shutil
import sys
import tempfile

# One BLAS/OpenMP thread per worker: multi-threaded BLAS stalled on 2 vCPUs,
# and parallelism comes from workers and the per-worker CPU pool instead.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

# Metrics from every worker are summed at scrape time (prometheus multiprocess
# mode): a fresh directory per start, so no stale numbers from a previous run.
_metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _metrics_dir:
    shutil.rmtree(_metrics_dir, ignore_errors=True)
    os.makedirs(_metrics_dir)
else:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="distill-metrics-")
# (before the app's import below: prometheus_client picks its mode when imported)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from app.config import ConfigError, load_config  # noqa: E402

try:
    load_config()
except ConfigError as exc:
    sys.stderr.write(f"distill: bad configuration: {exc}\n")
    sys.exit(2)


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip() or str(default)
    try:
        value = int(raw)
        if value <= 0:
            raise ValueError
    except ValueError:
        sys.stderr.write(f"distill: bad configuration: {name}={raw!r}: must be a positive integer\n")
        sys.exit(2)
    return value


def post_worker_init(worker):
    """On SIGTERM, give open streams a deadline a little inside the graceful timeout,
    so one that cannot finish ends with an `error` event before gunicorn closes it."""
    import signal

    from app.streaming import draining

    stop_accepting = worker.handle_exit

    def handle_exit(sig, frame):
        margin = min(2.0, worker.cfg.graceful_timeout / 2)
        draining.start(worker.cfg.graceful_timeout - margin)
        stop_accepting(sig, frame)

    signal.signal(signal.SIGTERM, handle_exit)


def child_exit(server, worker):
    """A dead worker's live gauges (active requests) must stop counting."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


wsgi_app = "app.wsgi:application"
worker_class = "gevent"
workers = _int_env("WEB_CONCURRENCY", 2)
bind = f"{os.environ.get('HOST', '0.0.0.0')}:{_int_env('PORT', 8080)}"
preload_app = False  # the model must load after fork (loaded before, workers ran 1.7x slower)
worker_connections = 1000
timeout = 120  # a worker whose loop is blocked this long is restarted (CPU runs off-loop)
graceful_timeout = 60  # SIGTERM: started streams get this long to finish
keepalive = 5
control_socket_disable = True  # no runtime control socket: nothing uses it, and several servers can share a host
accesslog = None  # the app writes one richer line per request (with chunk counts)
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")
# Merged over gunicorn's defaults ("console" is stdout, "error_console" stderr).
logconfig_dict = {
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": ["error_console"], "propagate": False},
        "distill.access": {"level": "INFO", "handlers": ["console"], "propagate": False},
        "app": {"level": "INFO", "handlers": ["error_console"], "propagate": False},
        "pipeline": {"level": "INFO", "handlers": ["error_console"], "propagate": False},
    },
}
