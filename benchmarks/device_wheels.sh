#!/usr/bin/env bash
# bash benchmarks/device_wheels.sh     (here, before a device run; needs PyPI, writes .whl/, ~45 MB)
#
# The lent GPU machines have torch, torchvision, accelerate, pillow, pyyaml, safetensors, pytest,
# scikit-learn and matplotlib, but not `datasets` (nor its dill / multiprocess), and maybe an
# older pyarrow than datasets needs. This downloads their Python 3.12 x86-64 wheels, at the
# versions installed here, into .whl/ (ignored by git, never committed); device_check.sh installs
# them there (pyarrow only if the machine's own is too old). Run it in the checkout that the
# device tool sends (the session's own), then: run(command="bash benchmarks/device_check.sh", carry=[".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
version() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p .whl
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "datasets==$(version datasets)" "dill==$(version dill)" "multiprocess==$(version multiprocess)" \
  "pyarrow==$(version pyarrow)"
ls -l .whl
