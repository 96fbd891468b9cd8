# The operator image: `docker build -f k8s/docker/operator.Dockerfile -t vlctl/operator:0.1.0 .` (repository root).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY pyproject.toml README.md /src/
COPY trainer /src/trainer
COPY controller /src/controller
COPY k8s /src/k8s
COPY cli /src/cli
# The operator never imports torch, but the package depends on it: the CPU wheel first, so pip does not pull
# a CUDA build of several GB.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" \
    && pip install /src && rm -rf /src

RUN useradd --uid 1000 --user-group --no-create-home --home-dir /tmp vlctl
USER 1000:1000
ENV HOME=/tmp
ENTRYPOINT ["vlctl", "operator"]
