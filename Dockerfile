# neoxfuse's reproducible build: the CUDA 13.0 toolkit, then exactly what CI runs.
#
#   docker build -t neoxfuse .
#   docker run --gpus all neoxfuse                      # `neoxfuse env`: GPU, driver, library
#   docker run --gpus all neoxfuse bench decode         # any CLI command
#   docker run --gpus all --entrypoint ./bazelw neoxfuse test //...   # the test suite
#
# Kept thin on purpose: every step is a script CI exercises (ci/setup.sh, bazelw).
FROM nvidia/cuda:13.0.1-devel-ubuntu24.04

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      bazel-bootstrap build-essential ca-certificates git python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /neoxfuse
COPY . .

# The same set-up CI runs (Bazel, .venv from requirements.txt), then the wheel, installed.
RUN ci/setup.sh \
 && ./bazelw build //python:wheel \
 && .venv/bin/python -m pip install --no-deps bazel-bin/python/neoxfuse-*.whl

ENTRYPOINT ["/neoxfuse/.venv/bin/neoxfuse"]
CMD ["env"]
