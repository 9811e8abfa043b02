# The MLflow tracking server of the nptm cluster: a slim Python image with MLflow, the
# PostgreSQL driver and the S3 client only (no CUDA, no torch). Built by docker-compose.yml.
#
# Pinned base: Python 3.11 on Debian 12. The tag follows 3.11 patch releases; to freeze the
# exact image, append the digest that `docker buildx imagetools inspect python:3.11-slim-bookworm`
# prints (FROM python:3.11-slim-bookworm@sha256:...).
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# Every package at the version of the lock (deploy/lock.py --pip-report wrote it); mlflow is the
# release of the nptm clients (deploy/constraints.txt).
COPY deploy/mlflow-constraints.txt /opt/mlflow/constraints.txt
RUN pip install -c /opt/mlflow/constraints.txt \
        "mlflow[auth]==3.17.2" "psycopg2-binary==2.9.13" "boto3==1.44.5" \
    && mlflow --version

# Unprivileged user, uid 1000 like the `ray` user of the nptm image. /mlflow/artifacts is where
# docker-compose.yml mounts the `mlflow-artifacts` volume; a fresh named volume copies this
# directory's owner.
RUN useradd --create-home --uid 1000 --gid users mlflow \
    && mkdir -p /mlflow/artifacts && chown mlflow:users /mlflow/artifacts
COPY --chown=mlflow:users deploy/mlflow_server.py /opt/mlflow/mlflow_server.py
USER mlflow
WORKDIR /home/mlflow

# Checks the environment, runs `mlflow db upgrade`, then execs `mlflow server`.
ENTRYPOINT ["python", "/opt/mlflow/mlflow_server.py"]
