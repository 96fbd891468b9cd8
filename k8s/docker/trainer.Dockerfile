# The training image: `docker build -f k8s/docker/trainer.Dockerfile -t vlctl/trainer:0.1.0 .` (repository root).
# CUDA PyTorch base pinned by tag to the torch the project tests with (Makefile: TORCH_VERSION); pip keeps
# that CUDA build, since the package only asks for torch>=2.4.
FROM pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DS_BUILD_OPS=0

COPY pyproject.toml README.md /src/
COPY trainer /src/trainer
COPY controller /src/controller
COPY k8s /src/k8s
COPY cli /src/cli
RUN pip install /src && rm -rf /src

# uid 1000, as the pods' securityContext says; /workspace is the working directory (an emptyDir in the pods).
RUN (id -u 1000 >/dev/null 2>&1 || useradd --uid 1000 --user-group --home-dir /workspace --no-create-home vlctl) \
    && mkdir -p /workspace && chown 1000:1000 /workspace
USER 1000:1000
ENV HOME=/workspace
WORKDIR /workspace
