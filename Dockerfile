# Distill as a container image: `make image`, then
#   docker run -p 8080:8080 distill
# BASE is any Debian-like image with Python 3.11 and venv (the official slim one by default).
ARG BASE=python:3.11-slim

# Stage 1: the dependencies, in a virtualenv, from setup.cfg's install_requires.
FROM ${BASE} AS deps
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY setup.cfg /src/setup.cfg
RUN python3 -c "import configparser; c = configparser.ConfigParser(); c.read('/src/setup.cfg'); print(c['options']['install_requires'])" > /src/requirements.txt \
    && python3 -m venv /opt/distill \
    && /opt/distill/bin/pip install --no-cache-dir -r /src/requirements.txt \
    && /opt/distill/bin/pip uninstall --yes pip setuptools \
    && find /opt/distill -depth -name tests -path '*/site-packages/*/tests' -exec rm -rf {} +

# Stage 2: the service. One layer of dependencies, one of code.
FROM ${BASE}
# /var/cache/distill: the embedding cache's disk store (DISTILL_CACHE_DIR; a volume there keeps it).
RUN useradd --no-log-init --no-create-home --uid 10001 --user-group --shell /usr/sbin/nologin distill \
    && install --directory --owner distill --group distill /var/cache/distill
COPY --from=deps /opt/distill /opt/distill
WORKDIR /srv/distill
COPY . ./

# ORT_DISABLE_TELEMETRY: onnxruntime's usage telemetry off; the service makes no outbound connection.
ENV PATH=/opt/distill/bin:$PATH \
    PYTHONPATH=/srv/distill \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ORT_DISABLE_TELEMETRY=1 \
    DISTILL_CACHE_DIR=/var/cache/distill \
    PORT=8080
USER 10001:10001

# The model's SHA-256 is checked and one request is embedded and answered (from
# local files only): an image that cannot serve fails here, not in production.
RUN python deploy/selfcheck.py

EXPOSE 8080
# No curl in slim images: the interpreter asks /health itself.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8080'), timeout=4)"]
# gunicorn drains on SIGTERM: open streams finish, or end with an `error` event,
# within its graceful timeout (60 s); give the container that long to stop
# (`docker run --stop-timeout 65`, Kubernetes' terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
CMD ["gunicorn", "-c", "gunicorn.conf.py"]
