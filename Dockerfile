# One image for svcbench on Kubernetes: the node agent (`svcbench agent ...`), the echo
# workload and the probe pods all run it (the objects kube/deploy.py creates name svcbench:dev).
#
#   docker build -t svcbench:dev . && kind load docker-image svcbench:dev
#
# The ebpf mode compiles its programs with bcc against the node's kernel headers: a pod that
# runs it mounts the node's /lib/modules and /usr/src (hostPath) and is privileged.
FROM debian:bookworm-slim

# The system tools svcbench drives (what `svcbench doctor` lists) and Debian's bcc. Versions
# come from the pinned Debian release: bookworm's archive keeps one version of each package
# and replaces it on every security update, so an exact pin would stop the build then.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-bpfcc \
        iproute2 iptables nftables ipset conntrack ipvsadm procps kmod ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A virtualenv that sees Debian's Python packages (bcc is packaged only there); the
# package's own dependencies come from PyPI with the `kube` extra (the API client).
ENV VIRTUAL_ENV=/opt/svcbench \
    PATH=/opt/svcbench/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv --system-site-packages "$VIRTUAL_ENV"

WORKDIR /src/svcbench
COPY . .
# What is installed is this checkout, with the agent's API client and locust (the throughput
# pods); its dependencies' bounds live in pyproject.toml, which every other install of
# svcbench (nox, CI, a user's venv) reads too.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[kube,bench]" \
    && svcbench --help >/dev/null \
    && rm -rf /src/svcbench/build

WORKDIR /
ENTRYPOINT ["svcbench"]
CMD ["--help"]
