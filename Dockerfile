# pipetrain's tests and fault scenarios in a container.
#
#   docker build -t pipetrain .
#   mkdir -p reports && chmod a+rwx reports
#   docker run --rm -v "$PWD/reports:/reports" pipetrain          # every scenario, reports in ./reports
#
# Builds with the classic builder and with BuildKit alike: no BuildKit-only syntax (no heredocs,
# no --mount). BASE_IMAGE may be any Debian-based image with Python 3.11+ and its venv module;
# scripts/docker-ci.sh builds such a base with debootstrap where Docker Hub is out of reach.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# tini is PID 1: it forwards `docker stop`'s SIGTERM to the command (for `pipetrain train`, the
# coordinator, which checkpoints at the next step boundary and exits 0) and reaps orphans.
# Not pinned: the version is whatever the base image's Debian release ships, and a pin would
# break the build as soon as that release takes a point update (DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin

# The non-root user that runs everything. A mounted /reports must be writable by APP_UID (or run
# with --user "$(id -u):$(id -g)": nothing at run time needs a home directory).
ARG APP_UID=10001
RUN groupadd --gid "${APP_UID}" pipetrain \
    && useradd --uid "${APP_UID}" --gid pipetrain --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin pipetrain \
    && install -d -o pipetrain -g pipetrain -m 0755 /app /reports \
    && python3 -m venv /opt/venv

# Run-time scratch goes to /tmp (any user can write there); one BLAS thread per process, as in tox.
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OPENBLAS_NUM_THREADS=1 \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    HYPOTHESIS_STORAGE_DIRECTORY=/tmp/hypothesis

WORKDIR /app

# Builds behind a TLS-intercepting proxy: put the proxy's CA bundle at the top of the build
# context as a *.pem file and pass --build-arg PIP_CERT=<its name>; pip runs in /app, where the
# file is copied (the glob copies nothing when there is none). PIP_INDEX_URL and
# PIP_EXTRA_INDEX_URL pass a mirror. Unset, pip uses its defaults.
ARG PIP_CERT
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL

# Dependencies first, read from pyproject.toml alone, so this layer is rebuilt only when they change.
COPY pyproject.toml *.pem ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb')); \
extras = p['project']['optional-dependencies']; \
print('\n'.join(p['build-system']['requires'] + p['project']['dependencies'] \
+ extras['test'] + extras['harness']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the source: installed without build isolation (setuptools is already here), so this step
# needs no network. Byte-code is compiled now, as root, because the user cannot write it later.
COPY . .
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && rm -rf build ./*.egg-info ./*.pem \
    && python -m compileall -q tests

# Numeric, so that a runtime can tell it is not root (runAsNonRoot) without reading /etc/passwd.
USER ${APP_UID}:${APP_UID}
VOLUME ["/reports"]
ENTRYPOINT ["tini", "--"]
# The scenario suite, what `tox -e scenarios` runs, with the reports in /reports.
CMD ["python", "-m", "pytest", "-n", "auto", "-p", "pipetrain_harness.pytest_plugin", "--report-dir", "/reports", "-q", "scenarios"]
