#!/usr/bin/env python3
"""Fetch the prebuilt OHIF viewer that medsim serves (``make viewer``).

    python plugin/ohif/fetch_viewer.py                  # checkout: -> var/ohif/3.13.2/dist (a no-op once there)
    python -m medsim.ohif.fetch_viewer                  # installed medsim: -> $MEDSIM_HOME/ohif/3.13.2/dist
    python plugin/ohif/fetch_viewer.py --print-dist     # print the dist folder and exit (fails if missing)

Where: ``--cache``, else ``$MEDSIM_VIEWER_CACHE``, else ``var/ohif`` in a checkout (this file under
``plugin/ohif/`` beside pyproject.toml), else ``$MEDSIM_HOME/ohif`` (default ``~/.cache/medsim/ohif``) for an
installed medsim, which ships this script as ``medsim.ohif.fetch_viewer``. ``medsim serve --viewer pinned`` and
``medsim stack`` call :func:`fetch` at first use.

What it does, with the pin in ``plugin/ohif/ohif-viewer.json`` (package, version, sha512 integrity):

1. ``npm pack @ohif/app@<version>`` (npm's own client and registry settings) into a temporary folder;
2. checks the tarball's sha512 against the pinned integrity *and* against the integrity the registry publishes for
   that version (``npm view ... dist.integrity``; skipped with a note when the registry cannot be asked, the pin
   still applies). Any mismatch stops here and nothing is unpacked;
3. unpacks ``package/dist`` only (regular files and folders, no links, nothing outside the folder), leaving out
   what medsim does not need (``drop`` in the pin: the ONNX runtime used by AI segmentation, the microscopy
   viewer, deploy files);
4. renames the result into place atomically and writes ``.medsim-viewer.json`` (version, integrity) last.

The viewer is never committed: ``var/`` is git-ignored. Standard library only (runs before the venv exists).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PIN_FILE = HERE / "ohif-viewer.json"
STAMP = ".medsim-viewer.json"


def in_checkout() -> bool:
    """True when this file is plugin/ohif/fetch_viewer.py of a medsim checkout (not the installed package copy)."""
    return HERE.name == "ohif" and HERE.parent.name == "plugin" and (ROOT / "pyproject.toml").is_file()


def default_cache() -> Path:
    """Where viewers are kept: $MEDSIM_VIEWER_CACHE, else var/ohif in a checkout, else $MEDSIM_HOME/ohif."""
    env = os.environ.get("MEDSIM_VIEWER_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    if in_checkout():
        return ROOT / "var" / "ohif"
    home = os.environ.get("MEDSIM_HOME", "").strip()
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "medsim") / "ohif"


DEFAULT_CACHE = default_cache()


class FetchError(Exception):
    """The viewer could not be fetched or failed its checks."""


def load_pin(path: Path = PIN_FILE) -> dict:
    pin = json.loads(Path(path).read_text())
    for key in ("package", "version", "integrity"):
        if not pin.get(key):
            raise FetchError(f"{path}: '{key}' is missing")
    if not pin["integrity"].startswith("sha512-"):
        raise FetchError(f"{path}: integrity must be a sha512 SRI string, got {pin['integrity'][:20]}...")
    return pin


def dist_dir(cache: Path, pin: dict) -> Path:
    return Path(cache) / pin["version"] / "dist"


def is_complete(dist: Path, pin: dict) -> bool:
    try:
        stamp = json.loads((dist / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return (stamp.get("version") == pin["version"] and stamp.get("integrity") == pin["integrity"]
            and (dist / "index.html").is_file())


def sri_sha512(path: Path) -> str:
    digest = hashlib.sha512()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def _npm() -> str:
    npm = shutil.which("npm")
    if not npm:
        raise FetchError("npm is not installed (Node.js 18+ with npm is needed once, to fetch the OHIF viewer)")
    return npm


def npm_pack(spec: str, dest: Path) -> Path:
    """``npm pack SPEC`` into dest; returns the tarball."""
    done = subprocess.run([_npm(), "pack", spec, "--json", "--pack-destination", str(dest)], capture_output=True,
                          text=True, timeout=900)
    if done.returncode != 0:
        raise FetchError(f"npm pack {spec} failed: {(done.stderr or done.stdout).strip()[-600:]}")
    try:
        info = json.loads(done.stdout)
        filename = info[0]["filename"]
    except (ValueError, LookupError, TypeError):
        tarballs = sorted(dest.glob("*.tgz"))
        if len(tarballs) != 1:
            raise FetchError(f"npm pack {spec}: cannot tell which file it wrote ({done.stdout[-300:]})") from None
        return tarballs[0]
    # npm names scoped tarballs "ohif-app-3.13.2.tgz"; the JSON may carry the scope form
    path = dest / filename.replace("@", "").replace("/", "-")
    if not path.is_file():
        tarballs = sorted(dest.glob("*.tgz"))
        if len(tarballs) != 1:
            raise FetchError(f"npm pack {spec}: {path.name} not found")
        path = tarballs[0]
    return path


def registry_integrity(spec: str) -> str | None:
    """The sha512 integrity the registry publishes for SPEC, or None when it cannot be asked."""
    try:
        done = subprocess.run([_npm(), "view", spec, "dist.integrity"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    value = done.stdout.strip()
    return value if done.returncode == 0 and value.startswith("sha512-") else None


def verify(tarball: Path, pin: dict, registry: str | None) -> str:
    actual = sri_sha512(tarball)
    if actual != pin["integrity"]:
        raise FetchError(f"{tarball.name}: sha512 {actual} does not match the pinned {pin['integrity']} "
                         f"({PIN_FILE.name}); refusing to unpack it")
    if registry is not None and registry != actual:
        raise FetchError(f"{tarball.name}: the registry publishes {registry} for {pin['package']}@{pin['version']}, "
                         f"the tarball has {actual}; refusing to unpack it")
    return actual


def _dropped(relative: str, drop: set[str]) -> bool:
    return relative.split("/", 1)[0] in drop


def unpack_dist(tarball: Path, out: Path, drop: set[str]) -> int:
    """Unpack package/dist/* into ``out`` (files and folders only, inside ``out``); returns the file count."""
    count = 0
    out.mkdir(parents=True)
    base = out.resolve()
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            name = member.name
            if not name.startswith("package/dist/"):
                continue
            relative = name[len("package/dist/"):].strip("/")
            if not relative or _dropped(relative, drop):
                continue
            target = (base / relative).resolve()
            if base not in target.parents:
                raise FetchError(f"unsafe path in the tarball: {name}")
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.chmod(target, 0o644)
                count += 1
            else:
                raise FetchError(f"unexpected entry (link or device) in the tarball: {name}")
    if not (out / "index.html").is_file() or not (out / "app-config.js").is_file():
        raise FetchError(f"{tarball.name} has no dist/index.html or dist/app-config.js: not a prebuilt OHIF viewer")
    return count


def fetch(cache: Path | None = None, pin: dict | None = None, *, tarball: Path | None = None,
          check_registry: bool = True, log=print) -> Path:
    """Make sure ``cache/<version>/dist`` holds the verified viewer (``cache``: :func:`default_cache`); returns
    that folder."""
    cache = Path(cache) if cache is not None else default_cache()
    pin = pin or load_pin()
    dist = dist_dir(cache, pin)
    if is_complete(dist, pin):
        log(f"OHIF viewer {pin['version']} is in {dist} (verified {pin['integrity'][:19]}...); nothing to do")
        return dist
    spec = f"{pin['package']}@{pin['version']}"
    dist.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dist.parent) as tmp:
        tmp = Path(tmp)
        if tarball is None:
            log(f"npm pack {spec} ...")
            tarball = npm_pack(spec, tmp)
        registry = registry_integrity(spec) if check_registry else None
        if check_registry and registry is None:
            log("note: could not ask the registry for the published integrity; checked against the pin only")
        integrity = verify(Path(tarball), pin, registry)
        staged = tmp / "dist"
        files = unpack_dist(Path(tarball), staged, set(pin.get("drop", [])))
        (staged / STAMP).write_text(json.dumps({"package": pin["package"], "version": pin["version"],
                                                "integrity": integrity, "files": files}, indent=2) + "\n")
        if dist.exists():
            shutil.rmtree(dist)
        os.replace(staged, dist)
    log(f"OHIF viewer {pin['version']}: {files} files in {dist} (sha512 matches the pin"
        f"{' and the registry' if registry else ''}; left out: {', '.join(pin.get('drop', [])) or 'nothing'})")
    return dist


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=default_cache(),
                        help="folder for viewers (default: %(default)s)")
    parser.add_argument("--tarball", type=Path, help="use this already downloaded tarball instead of npm pack")
    parser.add_argument("--no-registry-check", action="store_true",
                        help="check against the pin only (no `npm view` of the published integrity)")
    parser.add_argument("--print-dist", action="store_true", help="print the dist folder if complete, else fail")
    args = parser.parse_args(argv)
    try:
        pin = load_pin()
        if args.print_dist:
            dist = dist_dir(args.cache, pin)
            if not is_complete(dist, pin):
                print(f"the OHIF viewer is not fetched yet ({dist}); run `make viewer` (checkout) or "
                      "`python -m medsim.ohif.fetch_viewer`", file=sys.stderr)
                return 1
            print(dist)
            return 0
        fetch(args.cache, pin, tarball=args.tarball, check_registry=not args.no_registry_check)
    except FetchError as exc:
        print(f"fetch_viewer: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
