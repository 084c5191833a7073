# vitray on Ray: the image the Helm chart's RayJob/RayService pods, the RayJob submitter and the MLflow server run.
#   docker build -t ghcr.io/vitray/vitray:0.1.0 .                                       (GPU base: CUDA, NCCL)
#   docker build --build-arg BASE=rayproject/ray:2.60.0-py311-cpu -t ghcr.io/vitray/vitray:0.1.0-cpu .
# The Ray version must match the cluster's (charts/vitray values rayVersion) and the pin in pyproject.toml.
ARG RAY_VERSION=2.60.0
ARG BASE=rayproject/ray:${RAY_VERSION}-py311-gpu
FROM ${BASE}

ARG RAY_VERSION=2.60.0
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

# The Ray images run as `ray` (uid 1000, group users/100): the chart's runAsNonRoot/runAsUser match this.
USER ray
WORKDIR /home/ray/vitray

# torch first, as a pair (a bare `torch` resolved later could pull another build); then vitray with the cluster extras
# (MLflow on PostgreSQL/MySQL, S3/GCS artifacts), keeping the base image's Ray.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users platform ./platform
RUN pip install --no-cache-dir ".[cluster]" "ray[train,data,serve,default]==${RAY_VERSION}" \
 && python -c "import vitray, ray, torch, deepspeed, mlflow; print('vitray', vitray.__version__, 'ray', ray.__version__, 'torch', torch.__version__)"
# The Ray job entrypoints the chart's RayJobs run: python /home/ray/vitray/jobs/{train,score}.py /etc/vitray/run.yaml
COPY --chown=ray:users jobs ./jobs

ENV VITRAY_HOME=/home/ray/.vitray \
    PYTHONUNBUFFERED=1
