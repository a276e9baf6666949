# neoxfuse's reproducible build: the CUDA 13.0 toolkit, then exactly what CI runs.
#
#   docker build -t neoxfuse .
#   docker run --gpus all --cap-add SYS_ADMIN -v $PWD/out:/results neoxfuse   # the GPU pipeline
#   docker run --gpus all --entrypoint /neoxfuse/.venv/bin/neoxfuse neoxfuse env
#   docker run --gpus all --entrypoint ./bazelw neoxfuse test //...
#
# The pipeline (ci/gpu_pipeline) writes tests, NVML-monitored benchmarks, Nsight Compute profiles
# and the dashboard to /results. SYS_ADMIN lets ncu read the hardware counters (without it the
# profile stage is skipped with the reason); --pid=host makes shared-GPU detection reliable.
# Kept thin on purpose: every step is a script CI exercises (ci/setup.sh, bazelw, the pipeline).
FROM nvidia/cuda:13.0.1-devel-ubuntu24.04

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      bazel-bootstrap build-essential ca-certificates git python3 python3-venv \
      cuda-nsight-compute-13-0 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /neoxfuse
COPY . .

# The same set-up CI runs (Bazel, .venv from requirements.txt), then the wheel, installed.
RUN ci/setup.sh \
 && ./bazelw build //python:wheel \
 && .venv/bin/python -m pip install --no-deps "$(ci/wheel_path)"

ENV PYTHON=/neoxfuse/.venv/bin/python
VOLUME /results
ENTRYPOINT ["/neoxfuse/ci/gpu_pipeline"]
CMD ["--out", "/results"]
