# nptm runtime image: Ray head/worker nodes, the nptm CLI, and the MLflow server of the cluster.
# Built by docker-compose.yml; see deploy/README.md.
#
# Pinned base: Ray 2.60.0, Python 3.11, CUDA 12.8 (tag scheme {ray}-py{xy}-cu{xy}). Ray, the
# nptm clients and every node of one cluster must run the same Ray version.
FROM rayproject/ray:2.60.0-py311-cu128

# Optional extra wheel index, e.g. a PyTorch index such as https://download.pytorch.org/whl/cu128
# to pick the CUDA build of torch; pip reads PIP_EXTRA_INDEX_URL from the environment.
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0

# /shared is where the compose file mounts the `nptm-data` volume (datasets). A fresh named
# volume copies this directory, so it starts out owned by the unprivileged `ray` user.
USER root
RUN mkdir -p /opt/nptm /shared/data && chown -R ray /opt/nptm /shared
USER ray
WORKDIR /opt/nptm

# Dependencies first, from pyproject.toml alone, so that editing the source does not reinstall
# torch. The extras serve the MLflow server (PostgreSQL driver, S3 client, basic-auth app).
COPY --chown=ray pyproject.toml ./
COPY --chown=ray deploy/constraints.txt deploy/constraints.txt
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -c deploy/constraints.txt -r /tmp/requirements.txt \
        "mlflow[auth]" "psycopg2-binary>=2.9,<3" "boto3>=1.34,<2" \
    && rm /tmp/requirements.txt

# The package itself. The source tree stays in /opt/nptm (the working directory of
# `docker compose exec`), so `nptm sweep search_spaces/<grid>.yaml` finds the shipped grids.
COPY --chown=ray . .
RUN pip install -c deploy/constraints.txt --no-deps . \
    && nptm --version \
    && python -c "import ray, torch, mlflow; assert ray.__version__ == '2.60.0', ray.__version__"

CMD ["bash"]
