#!/bin/bash
# Wheels for a GPU node without network access whose Python already has a CUDA torch and the common
# scientific stack (numpy, pandas, pyarrow, tokenizers, safetensors, huggingface-hub, pyyaml, requests,
# protobuf, click, psutil, msgpack, ninja, einops, jaxtyping, pytest). This downloads what
# `bash bench/gpu_check.sh` imports beyond that, at the versions installed here, for the node's Python.
#   bash bench/gpu_wheels.sh DIR [PYTHON_VERSION]        e.g. bash bench/gpu_wheels.sh runs/wheels 3.12
# Then on the node, before the check:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl && export PYTHONPATH=/tmp/site
# The list is what importing deepspeed, datasets, sae_lens (which imports transformer_lens and wandb) and
# fpo_ds needs on such an image. deepspeed ships as a source archive: it is built here into a pure-Python
# wheel (its CUDA ops compile on first use; the check uses torch's AdamW and needs none).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:?usage: bash bench/gpu_wheels.sh DIR [PYTHON_VERSION]}
pyver=${2:-3.12}
py=${PYTHON:-.venv/bin/python}
pkgs=(
  transformers deepspeed hjson pydantic pydantic-core annotated-types typing-inspection
  datasets dill multiprocess fsspec
  sae-lens transformer-lens better-abc typeguard simple-parsing docstring-parser
  wandb cwevals platformdirs googleapis-common-protos opentelemetry-api opentelemetry-sdk opentelemetry-proto
  opentelemetry-semantic-conventions opentelemetry-exporter-otlp-proto-http opentelemetry-exporter-otlp-proto-common
  opentelemetry-exporter-otlp-common opentelemetry-exporter-http-transport
)
mkdir -p "$dir"
platforms=()
for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform linux_x86_64)
for pkg in "${pkgs[@]}"; do
  version=$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$pkg")
  if [ "$pkg" = deepspeed ]; then
    DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" "deepspeed==$version"
  else
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
      "${platforms[@]}" -d "$dir" "$pkg==$version"
  fi
done
du -ch "$dir"/*.whl | tail -n 1
