"""llama.cpp for the benchmarks that compare with it: built once, models converted to GGUF, same page-cache state.

llama.cpp comes from the PyPI sdist of llama-cpp-python (its ``vendor/llama.cpp``: CMake files, the tools,
``convert_hf_to_gguf.py``), downloaded with pip and built (CPU, native instructions, Release) into a cache
directory once; each tool (``llama-bench``, ``llama-quantize``, ``llama-server``) is built the first time a
benchmark asks for it. The converter copy accepts the random and demo tokenizers' unknown pre-tokenizer (it
would otherwise refuse it); nothing else is changed. Used by ``bench_vs_llamacpp.py``, ``bench_serve.py`` and
``bench_convert.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"
DEFAULT_CACHE = Path.home() / ".cache" / "dsv2cli" / "llamacpp"
# The converter refuses tokenizers it does not know; the benchmark's copy treats them as the default one.
PRE_TOKENIZER_CHECK = 'raise NotImplementedError("BPE pre-tokenizer was not recognized - update get_vocab_base_pre()")'
PRE_TOKENIZER_BYPASS = 'res = "default"  # dsv2 benchmark: random tokenizer'
QUANTIZED_GGUF = {"q4_0": "Q4_0"}  # GGUF types llama-quantize makes from a bf16 GGUF (the converter writes the others)
# -DLLAMA_BUILD_SERVER adds llama-server's target; its web UI is left out (no npm, no download: the benchmarks use the API)
CONFIGURE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DGGML_NATIVE=ON",
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def same_page_cache_state(files: list[Path]) -> None:
    """Every engine starts from the same state: the page cache emptied (as root), then this engine's files read.

    On a 24 GB machine the two engines' 16 GB copies cannot both stay cached; without this the one that ran
    last would find its files in memory and the other would read some from disk.
    """
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        log("cannot drop the page cache (not root): engines may start from different page-cache states")
    for file in files:
        with open(file, "rb") as handle:
            while handle.read(1 << 24):
                pass


def llama_source(cache: Path) -> Path:
    """``vendor/llama.cpp`` of the llama-cpp-python sdist, downloaded with pip into ``cache`` once."""
    source = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if (source / "CMakeLists.txt").is_file():
        return source
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not archive.is_file():
        log(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} sdist ...")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(cache)]
        subprocess.run([*command, f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], check=True, stdout=subprocess.DEVNULL)
    with tarfile.open(archive) as tar:
        tar.extractall(cache, filter="data")
    return source


def llama_tool(source: Path, name: str, jobs: int) -> Path:
    """``build/bin/NAME``, built (with the libraries it needs) unless the cached build has it.

    The build is configured again first: cheap next to compiling, and it adds targets (``llama-server``) that a
    build configured by an older version of this module lacks; what is built already stays.
    """
    binary = source / "build" / "bin" / name
    if binary.is_file():
        return binary
    log(f"building {name} in {source / 'build'} (once; llama-bench and its libraries take ~15 minutes on 2 cores) ...")
    configure = ["cmake", "-S", str(source), "-B", str(source / "build"), *CONFIGURE_FLAGS]
    if shutil.which("ninja") and not (source / "build" / "CMakeCache.txt").is_file():
        configure += ["-G", "Ninja"]  # a configured build keeps its generator
    subprocess.run(configure, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["cmake", "--build", str(source / "build"), "--target", name, "-j", str(jobs)], check=True, stdout=subprocess.DEVNULL
    )
    return binary


def llama_bench_binary(source: Path, jobs: int) -> Path:
    return llama_tool(source, "llama-bench", jobs)


def llama_quantize_binary(source: Path, jobs: int) -> Path:
    return llama_tool(source, "llama-quantize", jobs)


def llama_server_binary(source: Path, jobs: int) -> Path:
    return llama_tool(source, "llama-server", jobs)


def converter(source: Path, cache: Path) -> Path:
    """A copy of ``convert_hf_to_gguf.py`` (and its ``conversion`` package) that accepts any pre-tokenizer."""
    copy = cache / "converter"
    script = copy / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    staging = cache / "converter.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copy2(source / "convert_hf_to_gguf.py", staging)
    shutil.copytree(source / "conversion", staging / "conversion")
    base = staging / "conversion" / "base.py"
    text = base.read_text()
    if PRE_TOKENIZER_CHECK not in text:
        raise SystemExit(f"the pre-tokenizer check was not found in {base}; update PRE_TOKENIZER_CHECK")
    base.write_text(text.replace(PRE_TOKENIZER_CHECK, PRE_TOKENIZER_BYPASS))
    staging.rename(copy)
    return script


def to_gguf(script: Path, source: Path, checkpoint: Path, outtype: str, directory: Path | None = None) -> Path:
    """``checkpoint`` (HF layout) as ``{name}-{outtype}.gguf`` in ``directory`` (default: beside it), made once."""
    out = (directory or checkpoint.parent) / f"{checkpoint.name}-{outtype}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if outtype in QUANTIZED_GGUF:  # llama.cpp's documented path: the converter to bf16, then llama-quantize
        bf16 = to_gguf(script, source, checkpoint, "bf16", directory)
        log(f"llama-quantize to {QUANTIZED_GGUF[outtype]} ...")
        partial = out.with_suffix(".partial")
        quantize = llama_quantize_binary(source, max(1, os.cpu_count() or 1))
        subprocess.run([str(quantize), str(bf16), str(partial), QUANTIZED_GGUF[outtype]], check=True, capture_output=True)
        partial.rename(out)
        bf16.unlink()  # made here only as the quantizer's input; as large as the checkpoint
        return out
    log(f"converting to GGUF {outtype} ...")
    env = {**os.environ, "PYTHONPATH": str(source / "gguf-py")}
    partial = out.with_suffix(".partial")
    subprocess.run(
        [sys.executable, str(script), str(checkpoint), "--outtype", outtype, "--outfile", str(partial)],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    partial.rename(out)
    return out


def llama_server_command(
    binary: Path, gguf: Path, threads: int, slots: int, slot_context: int, port: int, repack: bool = True
) -> list[str]:
    """``llama-server`` as a user starts it: ``slots`` parallel slots of ``slot_context`` tokens each, continuous batching.

    ``-c`` is the context of all slots together (llama-server gives each of ``-np`` slots an equal share when the
    slot count is given); continuous batching is on by default and named anyway. ``repack=False``: no weight
    repacking (``--no-repack``), which llama-bench needs on DeepSeek-V2 Q8_0 files here
    (``GGML_ASSERT(*cur_backend_id != -1)``).
    """
    command = [str(binary), "-m", str(gguf), "-t", str(threads), "-np", str(slots), "-c", str(slots * slot_context)]
    command += ["--cont-batching", "--host", "127.0.0.1", "--port", str(port)]
    return command if repack else [*command, "--no-repack"]
