# genco: one image for `genco serve` (joiner, learner, selector) and `genco simulate`.
#   docker build -t genco .
#   docker run --rm -e GENCO_BROKER=kafka://host:9092 -p 127.0.0.1:9464:9464 -v genco-state:/data genco
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The CPU build of torch first, pinned to pyproject's torch==: the default index would pull a
# multi-GB CUDA build. `pip install .` below then finds the pin already satisfied (2.13.0+cpu).
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /app

# The remaining dependencies, read from pyproject alone, at the versions CI tested (constraints.txt),
# so that a source change does not reinstall them.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -c constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The project itself (.dockerignore keeps the venv, state and benchmark output out of the context).
COPY . .
RUN pip install . -c constraints.txt && rm -rf build ./*.egg-info

# An unprivileged user owning the state directory: a named volume mounted on /data starts as a
# copy of it, owner included.
RUN useradd --create-home --uid 10001 --user-group genco \
    && mkdir -p /data \
    && chown genco:genco /data
USER genco

# Metrics listen on every interface of the container (GENCO_METRICS_HOST; genco's own default is
# 127.0.0.1): publish them on the host's loopback, -p 127.0.0.1:9464:9464.
ENV GENCO_STATE_DIR=/data \
    GENCO_METRICS_PORT=9464 \
    GENCO_METRICS_HOST=0.0.0.0
EXPOSE 9464

# Unhealthy while serve is down, an agent crash-loops, or one has not fetched for 60 s.
HEALTHCHECK --interval=15s --timeout=10s --start-period=60s --retries=4 CMD ["genco", "status"]

# genco serve stops cleanly (final snapshot) on SIGTERM, Docker's default stop signal.
CMD ["genco", "serve"]
