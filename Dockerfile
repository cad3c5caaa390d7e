# examhook image: one image for both processes.
#   docker run ... examhook:latest                 -> examhook receive (default CMD)
#   docker run ... examhook:latest worker          -> examhook worker
# Configuration comes at run time only (environment + a mounted TOML file, see
# compose.yaml and docs/deployment.md); nothing secret is built into the image.
# No `# syntax=` line: BuildKit would fetch that frontend image from a registry, and the
# build must work where the only images are local ones (docs/deployment.md, air-gapped).

ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: install the project and its dependencies into a self-contained venv ----
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# .dockerignore lets only the package sources and pyproject.toml through.
COPY . .
# pip compiles the bytecode here, so containers with a read-only root start fast.
RUN pip install .

# ---- runtime: the venv, a non-root user, nothing else ----
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="examhook" \
      org.opencontainers.image.description="Receive Synap 'Exam Results Released' webhooks and deliver them reliably"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN groupadd --system --gid 10001 examhook \
 && useradd --system --uid 10001 --gid examhook --home-dir /var/lib/examhook --create-home \
            --shell /usr/sbin/nologin examhook

COPY --from=build /opt/venv /opt/venv

WORKDIR /var/lib/examhook
USER 10001:10001

EXPOSE 8080

# The receiver answers SIGTERM by finishing in-flight requests (up to 30 s); the worker
# cancels in-flight jobs, which arq queues again. Give containers >= 40 s to stop.
STOPSIGNAL SIGTERM

# Liveness of the receiver (the default command). No curl in slim images: stdlib urllib.
# Worker containers override this (compose.yaml: `examhook worker --check`).
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["examhook"]
CMD ["receive"]
