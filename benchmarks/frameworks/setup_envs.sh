#!/usr/bin/env bash
# Create the virtual environments of the framework benchmark, one per Keras backend:
#
#   benchmarks/frameworks/setup_envs.sh                      # all of them
#   benchmarks/frameworks/setup_envs.sh keras-jax            # only these
#
# Each lives in benchmarks/frameworks/envs/<name> (gitignored) and gets exactly
# requirements-<name>.txt: TensorFlow, JAX and PyTorch pin numpy, protobuf and
# ml-dtypes differently, so they never share an environment, and none of them
# touches the project's own .venv. Idempotent: an environment whose marker
# matches its requirements file is left alone; a changed file or a failed
# install rebuilds it from scratch (the marker is written last).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python3}"
all=(keras-tensorflow keras-jax keras-torch)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=("${all[@]}")

for name in "${names[@]}"; do
    req="$here/requirements-$name.txt"
    if [ ! -f "$req" ]; then
        echo "setup_envs: unknown environment '$name' (known: ${all[*]})" >&2
        exit 2
    fi
    env="$here/envs/$name"
    marker="$env/.installed"
    want="$(sha256sum "$req" | cut -d' ' -f1)"
    if [ -f "$marker" ] && [ "$(cat "$marker")" = "$want" ]; then
        echo "setup_envs: $name is up to date ($env)"
        continue
    fi
    echo "setup_envs: creating $name in $env"
    rm -rf "$env"
    "$python" -m venv "$env"
    "$env/bin/python" -m pip install --quiet --upgrade pip
    "$env/bin/python" -m pip install --quiet -r "$req"
    # The resolved versions of everything, for the benchmark's record.
    "$env/bin/python" -m pip freeze --all > "$env/freeze.txt"
    echo "$want" > "$marker"
    echo "setup_envs: $name ready ($(du -sh "$env" | cut -f1))"
done
