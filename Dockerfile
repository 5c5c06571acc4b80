# The image `meshca install` names (default meshca:VERSION):
#   docker build -t meshca:0.1.0 .
# Python 3.11, the version the test suite runs on.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

COPY pyproject.toml README.md /tmp/meshca/
COPY meshca /tmp/meshca/meshca
RUN pip install /tmp/meshca && rm -rf /tmp/meshca

# A numeric user, so Kubernetes can check runAsNonRoot; the Deployment runs as the same ids.
RUN groupadd --system --gid 10001 meshca \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin meshca
USER 10001:10001

# gRPC (TLS) and /metrics, /livez, /readyz, as `meshca install` configures them
EXPOSE 8443 9090
ENTRYPOINT ["meshca", "serve"]
