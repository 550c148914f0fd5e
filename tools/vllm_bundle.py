"""Bring vLLM 0.24.0 to the GPU machine, which has torch 2.11.0+cu130 but no vLLM and no network.

`build` downloads, on this (networked) side, the cp312 wheels of vLLM and of the packages the GPU image lacks
(`tools/vllm_gpu_requirements.txt`, pinned to what `pip install vllm==0.24.0` resolves), unpacks them into one
site folder, leaves out what a Hopper GPU never loads, and packs the rest as one xz tar cut into pieces small
enough for one device call each (a call carries at most 64 MiB with the working tree):

    python tools/vllm_bundle.py build --out .vllm   # .vllm/part-00, part-01, ... (64 MiB less the tracked tree each)

On the GPU machine each piece is moved out of the repository as it arrives (one call each, in a row, while the
machine stays warm), then joined and unpacked into /tmp/site, put first on PYTHONPATH:

    python3 tools/vllm_bundle.py stash .vllm               # once per piece: moves it to /tmp/vllm-parts
    python3 tools/vllm_bundle.py unpack [--extra DIR]      # joins the pieces, unpacks to /tmp/site
"""

from __future__ import annotations

import argparse
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
VLLM = "vllm==0.24.0"
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux1_x86_64"]
# Never loaded on Hopper (sm_90) for dense and MoE bf16 models: the Ampere FlashAttention-2 build, Blackwell and
# DeepGEMM header trees, the Rust tool-call parser binary and the OpenAI server's web assets.
LEFT_OUT = ["vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so", "vllm/third_party/deep_gemm", "vllm/third_party/fmha_sm100",
            "vllm/vllm-rs", "vllm/entrypoints/openai/swagger", "include", "bin"]
CARRY_BYTES = 64 * 2**20 - 2 * 10**6  # what a device call carries, less a margin for files written meanwhile
PARTS = Path("/tmp/vllm-parts")
SITE = Path("/tmp/site")


def build(out: Path, wheels: Path) -> None:
    wheels.mkdir(parents=True, exist_ok=True)
    platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platform_args, "-d", str(wheels), VLLM,
                    "-r", str(HERE / "vllm_gpu_requirements.txt")], check=True)
    site = wheels.parent / "site"
    shutil.rmtree(site, ignore_errors=True)
    for wheel in sorted(wheels.glob("*.whl")):
        zipfile.ZipFile(wheel).extractall(site)
    for rel in LEFT_OUT:
        path = site / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    packed = out / "site.tar.xz"
    with tarfile.open(packed, "w:xz", preset=6) as tar:
        for entry in sorted(site.iterdir()):
            tar.add(entry, arcname=entry.name)
    piece = CARRY_BYTES - tracked_bytes()
    with open(packed, "rb") as f:
        for i, chunk in enumerate(iter(lambda: f.read(piece), b"")):
            (out / f"part-{i:02d}").write_bytes(chunk)
    packed.unlink()
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 1e6:.0f} MB" for p in sorted(out.iterdir()))
    print(f"{out}: {sizes}")


def tracked_bytes() -> int:
    """The checkout's tracked files, which travel with every call beside the piece."""
    names = subprocess.run(["git", "ls-files", "-z"], capture_output=True, check=True).stdout.split(b"\0")
    return sum(os.path.getsize(n) for n in names if n and os.path.exists(n))


def stash(folder: Path) -> None:
    PARTS.mkdir(parents=True, exist_ok=True)
    for part in sorted(folder.glob("part-*")):
        shutil.move(str(part), PARTS / part.name)
    print("stashed:", " ".join(sorted(p.name for p in PARTS.iterdir())))


class _Joined:
    """The pieces, read in order as one stream."""

    def __init__(self, parts: list[Path]):
        self.parts, self.f = list(parts), None

    def read(self, n: int = -1) -> bytes:
        while True:
            if self.f is None:
                if not self.parts:
                    return b""
                self.f = open(self.parts.pop(0), "rb")
            data = self.f.read(n)
            if data:
                return data
            self.f.close()
            self.f = None


def unpack(extra: Path | None) -> None:
    parts = sorted(PARTS.glob("part-*"))
    with tarfile.open(fileobj=lzma.LZMAFile(_Joined(parts)), mode="r|") as tar:
        tar.extractall(SITE, filter="tar")
    wheels = sorted(extra.glob("*.whl")) if extra else []
    for wheel in wheels:  # small needs found after the pieces were cut, carried beside the last call
        zipfile.ZipFile(wheel).extractall(SITE)
    print(f"unpacked {len(parts)} pieces and {len(wheels)} wheels into {SITE}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", type=Path, default=Path(".vllm"))
    b.add_argument("--wheels", type=Path, default=Path("out/vllm-bundle/wheels"))
    s = sub.add_parser("stash")
    s.add_argument("folder", type=Path)
    u = sub.add_parser("unpack")
    u.add_argument("--extra", type=Path, help="a folder of further wheels to unpack beside")
    args = parser.parse_args()
    if args.command == "build":
        build(args.out, args.wheels)
    elif args.command == "stash":
        stash(args.folder)
    else:
        unpack(args.extra)


if __name__ == "__main__":
    main()
