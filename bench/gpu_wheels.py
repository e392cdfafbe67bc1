"""The pinned wheels the device needs (bench/gpu_wheels.txt), checked for consistency.

    python bench/gpu_wheels.py check .whl      # after bench/gpu_prepare.sh downloaded them

Checks: every pin is exact (NAME==VERSION) and the packages the server needs are pinned
(REQUIRED); .whl holds exactly one wheel per pin, of the pinned version, for CPython 3.12 on
x86-64 Linux; every requirement of every wheel (Requires-Dist, without extras, markers
evaluated for the device's Python 3.12 on Linux x86-64) is met by a pin's version or by a
package of the device image (IMAGE: present by name; by version where its pip list gave one).
Exit 1 with one line per problem. Standard library and `packaging` only (both on the device).
"""

from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

PINS = Path(__file__).with_name("gpu_wheels.txt")
# What hearth.server.app and the engine import that the image lacks or holds too old (fastapi
# needs starlette >= 1.6 and opentelemetry-api; pydantic pins pydantic-core exactly).
REQUIRED = {
    "fastapi",
    "starlette",
    "uvicorn",
    "pydantic",
    "pydantic-core",
    "typing-extensions",
    "typing-inspection",
    "annotated-types",
    "opentelemetry-api",
    "llguidance",
    "jsonschema",
    "platformdirs",
    "gguf",
}
# The device image's Python packages (/work/.library/device/KINDS.md, read 2026-11-17) ...
IMAGE_NAMES = """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
    botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
    coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
    diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
    frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
    hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
    jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
    linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl
    meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
    narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti
    nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile
    nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
    nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime
    onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
    orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
    prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
    pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
    pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich
    sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
    sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
    statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
    tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
    torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions
    typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()  # noqa: SIM905 (the list as KINDS.md prints it)
# ... and the versions its pip list showed (2026-11), where it showed one.
IMAGE_VERSIONS = {
    "accelerate": "1.15.0",
    "huggingface-hub": "1.33.0",
    "numpy": "2.5.2",
    "safetensors": "0.8.0",
    "sentencepiece": "0.2.2",
    "tokenizers": "0.23.2",
    "torch": "2.11.0",
    "transformers": "5.17.0",
    "triton": "3.6.0",
}
IMAGE: dict[str, str | None] = {canonicalize_name(n): IMAGE_VERSIONS.get(n) for n in IMAGE_NAMES}
# The device's interpreter, for requirement markers.
DEVICE_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}


def parse_pins(text: str) -> dict[str, Version]:
    """NAME==VERSION lines (comments and blank lines skipped) -> {canonical name: version}.
    Raises ValueError for a line that is not an exact pin, or a name pinned twice."""
    pins: dict[str, Version] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.+!-]*)", line)
        if match is None:
            raise ValueError(f"line {number}: not an exact pin NAME==VERSION: {line!r}")
        name = canonicalize_name(match.group(1))
        if name in pins:
            raise ValueError(f"line {number}: {name} pinned twice")
        pins[name] = Version(match.group(2))
    return pins


def requirement_problems(
    requires: dict[str, list[str]], pins: dict[str, Version], image: dict[str, str | None]
) -> list[str]:
    """Unmet requirements: {package: its Requires-Dist lines} against the pins, then the image
    (a version it lacks counts as met: only its presence is known)."""
    problems = []
    for package, lines in sorted(requires.items()):
        for line in lines:
            try:
                req = Requirement(line)
            except InvalidRequirement as exc:
                problems.append(f"{package}: unreadable requirement {line!r}: {exc}")
                continue
            if req.marker is not None and not req.marker.evaluate(DEVICE_ENV):
                continue  # an extra, or another Python / platform
            name = canonicalize_name(req.name)
            if name in pins:
                if not req.specifier.contains(pins[name], prereleases=True):
                    problems.append(f"{package} needs {req}, pinned {name}=={pins[name]}")
            elif name in image:
                known = image[name]
                if known is not None and not req.specifier.contains(known, prereleases=True):
                    problems.append(f"{package} needs {req}, the device image has {known}")
            else:
                problems.append(f"{package} needs {req}: neither pinned nor in the device image")
    return problems


def pin_problems(pins: dict[str, Version]) -> list[str]:
    return [f"{name} is not pinned (the server needs it)" for name in sorted(REQUIRED - set(pins))]


def read_wheels(folder: Path) -> tuple[dict[str, Version], dict[str, list[str]], list[str]]:
    """The wheels of `folder`: ({name: version}, {name: Requires-Dist lines}, problems: two
    versions of one name, a wheel the device's CPython 3.12 on x86-64 Linux cannot install)."""
    versions: dict[str, Version] = {}
    requires: dict[str, list[str]] = {}
    problems = []
    for wheel in sorted(folder.glob("*.whl")):
        name, version, _, tags = parse_wheel_filename(wheel.name)
        if name in versions:
            problems.append(f"{name}: two wheels ({versions[name]}, {version}): pip refuses both")
        versions[name] = version
        if not any(_installable(tag) for tag in tags):
            problems.append(f"{wheel.name}: not for CPython 3.12 on x86-64 Linux")
        with zipfile.ZipFile(wheel) as archive:
            [meta] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
            text = archive.read(meta).decode("utf-8", "replace")
        header = text.split("\n\n", 1)[0]
        requires[name] = [
            line.split(":", 1)[1].strip()
            for line in header.splitlines()
            if line.startswith("Requires-Dist:")
        ]
    return versions, requires, problems


def _installable(tag) -> bool:
    interpreter_ok = tag.interpreter in ("py3", "cp312") or (
        tag.abi == "abi3" and tag.interpreter.startswith("cp3")
    )
    platform_ok = tag.platform == "any" or (
        tag.platform.endswith("x86_64") and tag.platform.startswith(("manylinux", "linux"))
    )
    return interpreter_ok and tag.abi in ("none", "abi3", "cp312") and platform_ok


def check_folder(folder: Path, pins: dict[str, Version]) -> list[str]:
    """Every problem of the wheels in `folder` against `pins` (see the module docstring)."""
    versions, requires, problems = read_wheels(folder)
    problems += pin_problems(pins)
    for name, version in sorted(pins.items()):
        if name not in versions:
            problems.append(f"{name}=={version}: no wheel in {folder}")
        elif versions[name] != version:
            problems.append(f"{name}: wheel {versions[name]}, pinned {version}")
    extra = sorted(set(versions) - set(pins))
    problems += [f"{name}: a wheel that is not pinned" for name in extra]
    return problems + requirement_problems(requires, pins, IMAGE)


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] != "check":
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    pins = parse_pins(PINS.read_text())
    problems = check_folder(Path(sys.argv[2]), pins)
    for problem in problems:
        print(f"gpu_wheels: {problem}")
    if not problems:
        print(f"gpu_wheels: {len(pins)} wheels, pinned and consistent for the device's Python 3.12")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
