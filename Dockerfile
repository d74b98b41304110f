# The image every Ray node of a real cluster runs: the CPU head and the GPU workers of
# cluster.yaml, and the pods of cluster/kuberay/. Build and push it as cluster/README.md says.
#
# Base: TensorFlow's own GPU image at the version pyproject.toml allows
# (tensorflow>=2.21,<2.22; tests/test_deploy_docker.py keeps the two in step). It holds the
# CUDA 12 / cuDNN 9 user-space libraries this TensorFlow wheel was built against (the exact
# pair is in TensorFlow's "tested build configurations" table; the built image prints it,
# see the check below). The host needs only an NVIDIA driver new enough for that CUDA and
# the NVIDIA container toolkit: the AWS Deep Learning Base AMI that cluster.yaml names has both.
# The image is Ubuntu with Python 3.11 (TensorFlow's images have shipped 3.11 since 2.14;
# it reports itself as 3.11.0rc1, which pip accepts for requires-python >=3.11). The check
# below fails the build if a future base brings a Python that pyproject.toml does not allow.
FROM tensorflow/tensorflow:2.21.0-gpu

ENV DEBIAN_FRONTEND=noninteractive
# rsync and ssh: the cluster launcher copies files into the container with rsync and the
# head's autoscaler reaches new workers over ssh from inside it. wget: KubeRay's probes.
# tmux: `ray exec --tmux` for long commands (the final job). Versions follow the base's release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends openssh-client rsync wget tmux ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Some tools (and `chestxpert sweep submit`'s default entrypoint on a cluster) call `python`.
RUN command -v python >/dev/null || ln -s "$(command -v python3)" /usr/local/bin/python \
    && python -c "import sys; v = sys.version_info[:2]; assert (3, 11) <= v < (3, 13), sys.version"

# The user Ray runs as: uid 1000, the uid of the ssh user (ubuntu) on the AMI, so the files
# the cluster launcher copies onto the host (the Ray token) stay readable in the container.
# Newer Ubuntu bases already have a user 1000 (ubuntu): it is replaced. The folders the
# launcher mounts files into exist beforehand, so Docker does not create them owned by root,
# and the working tree is ray's (the CLI keeps its workspace, .chestxpert/, there).
RUN if id -u 1000 >/dev/null 2>&1; then userdel --remove "$(id -nu 1000)"; fi \
    && useradd --create-home --uid 1000 --shell /bin/bash ray \
    && install -d -o ray -g ray -m 700 /home/ray/.ray /home/ray/.mlflow \
    && install -d -o ray -g ray /home/ray/chestxpert

# HOME must be set here, not left to `docker run`: the cluster launcher reads it from the
# image's config to place file_mounts (~/.ray/auth_token) inside the container.
# RAY_AUTH_TOKEN_PATH names that file for every process, ours included: without it the
# `chestxpert` CLI would point Ray at a workspace token that does not exist on a node.
# RAY_AUTH_TOKEN, where set (KubeRay sets it), takes precedence over the path.
# hadolint ignore=DL3064
ENV HOME=/home/ray \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_AUTH_MODE=token \
    RAY_AUTH_TOKEN_PATH=/home/ray/.ray/auth_token \
    RAY_USAGE_STATS_ENABLED=0 \
    TF_CPP_MIN_LOG_LEVEL=2

WORKDIR /home/ray/chestxpert
COPY --chown=ray:ray . .

# The project itself (not editable) with exactly the Ray the cluster runs: every node and the
# machine that submits jobs must run the same Ray. TensorFlow stays the base image's build.
# No credential is baked in: nodes get S3 through their instance profile / service account,
# the Ray token and MLflow credentials through files the launcher mounts (cluster.yaml).
# PIP_BREAK_SYSTEM_PACKAGES only matters if a base marks its Python externally managed.
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python -m pip install "ray[tune,default]==2.60.0" . \
    && rm -rf build ./*.egg-info \
    && python -c "import ray; assert ray.__version__ == '2.60.0', ray.__version__" \
    && python -c "import tensorflow as tf; info = tf.sysconfig.get_build_info(); assert info.get('is_cuda_build'), info; print('TensorFlow', tf.__version__, 'CUDA', info.get('cuda_version'), 'cuDNN', info.get('cudnn_version'))"

# Numeric, so that Kubernetes' runAsNonRoot can verify it: the user `ray`.
USER 1000:1000
CMD ["bash"]
