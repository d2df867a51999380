# ipqs-bulkd container image: README.md ("Run it in a container").
#
#   docker build -t ipqs-bulkd .
#   docker run -d -v ipqs-spool:/spool -e IPQS_API_KEY ipqs-bulkd
#
# Configuration: the environment (IPQS_BULKD_<SECTION>_<KEY>), or a file mounted at
# /etc/ipqs-bulkd/config.toml; the ENV lines below win over that file. The key: IPQS_API_KEY,
# else the file /run/secrets/ipqs_api_key (a Docker or Kubernetes secret).

# -- stage 1: build the wheel --------------------------------------------------------------
FROM python:3.11.14-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY daemon ./daemon
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# -- stage 2: install it with pinned dependencies ------------------------------------------
# (RUN --mount needs BuildKit, the default builder since Docker 23.)
FROM python:3.11.14-slim-bookworm
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    --mount=type=bind,source=constraints.txt,target=/constraints.txt \
    python -m venv /opt/ipqs-bulkd/venv \
    && /opt/ipqs-bulkd/venv/bin/pip install --no-cache-dir --constraint /constraints.txt \
        /wheels/*.whl \
    && useradd --system --uid 10001 --user-group --no-create-home --home-dir /spool \
        --shell /usr/sbin/nologin ipqs-bulkd \
    && install -d -o ipqs-bulkd -g ipqs-bulkd -m 0750 /spool

# The spool on a volume. Writers in other containers are invisible in this /proc; a kernel
# lease probe sees them, but needs CAP_LEASE, which a non-root user only gets as an
# ambient capability: start the container as root with only LEASE, SETUID and SETGID and
# let setpriv drop to 10001 keeping LEASE (examples/docker-compose.yml). Without it the
# daemon says so once and takes a file once it has been quiet for watch.quiet_seconds
# (README.md, "Run it in a container").
ENV PATH=/opt/ipqs-bulkd/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    IPQS_BULKD_SPOOL_ROOT=/spool \
    IPQS_BULKD_HEALTH_HOST=0.0.0.0 \
    IPQS_BULKD_HEALTH_PORT=9187 \
    IPQS_BULKD_WATCH_WRITER_CHECK=lease
# Where the key is read from when IPQS_API_KEY is unset: a path, not a secret (DL3064 goes
# by the variable's name alone).
# hadolint ignore=DL3064
ENV IPQS_BULKD_API_KEY_FILE=/run/secrets/ipqs_api_key
VOLUME /spool
EXPOSE 9187
USER 10001:10001
WORKDIR /spool

# No curl in a slim image: the daemon's own Python asks /healthz (the event loop answers).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('IPQS_BULKD_HEALTH_PORT', '9187') + '/healthz', timeout=4)"]

# Exec form: the daemon is PID 1 and gets SIGTERM itself; it drains uploads for
# service.shutdown_seconds (8 s, inside Docker's 10 s default stop timeout).
STOPSIGNAL SIGTERM
ENTRYPOINT ["ipqs-bulkd"]
CMD ["run"]
