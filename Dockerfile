# nptm runtime image: Ray head/worker nodes and the nptm CLI (the MLflow server has its own slim
# image, deploy/mlflow.Dockerfile). Built by docker-compose.yml; see deploy/README.md.
#
# Pinned base: Ray 2.60.0, Python 3.11, CUDA 12.8 (tag scheme {ray}-py{xy}-cu{xy}). Ray, the
# nptm clients and every node of one cluster must run the same Ray version. To freeze the exact
# image, append the digest that `docker buildx imagetools inspect rayproject/ray:2.60.0-py311-cu128`
# prints (FROM rayproject/ray:2.60.0-py311-cu128@sha256:...).
FROM rayproject/ray:2.60.0-py311-cu128

# torch and torchvision come from PyTorch's index for the base image's CUDA (cu128): PyPI's
# default Linux wheel is built for another CUDA. deploy/constraints.txt pins them as +cu128.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0

# /data (datasets, read-only) and /storage (results) are where docker-compose.yml bind-mounts
# the host directories NPTM_DATA_DIR and NPTM_STORAGE_DIR; /ray-metrics holds the Grafana
# dashboards the Ray head writes (its volume takes this directory's owner, `ray`).
USER root
RUN mkdir -p /opt/nptm /data /storage /ray-metrics && chown -R ray /opt/nptm /storage /ray-metrics
USER ray
WORKDIR /opt/nptm

# Dependencies first, from pyproject.toml alone, so that editing the source does not reinstall
# torch. Every package of the closure is pinned by the lock deploy/constraints.txt (written by
# deploy/lock.py); pip fails rather than resolve anything the lock does not allow.
COPY --chown=ray pyproject.toml ./
COPY --chown=ray deploy/constraints.txt deploy/constraints.txt
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --extra-index-url "${TORCH_INDEX_URL}" -c deploy/constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt \
    && python -c "import torch; assert torch.version.cuda == '12.8', f'torch built for CUDA {torch.version.cuda}, base image has 12.8'"

# The package itself. The source tree stays in /opt/nptm (the working directory of
# `docker compose exec`), so `nptm sweep search_spaces/<grid>.yaml` finds the shipped grids.
COPY --chown=ray . .
RUN pip install -c deploy/constraints.txt --no-deps . \
    && nptm --version \
    && python -c "import ray, torch, mlflow; assert ray.__version__ == '2.60.0', ray.__version__"

CMD ["bash"]
