"""Where py-feat's model weights come from, and one clear line when they cannot be had.

py-feat 2.1.5 fetches every model with ``hf_hub_download(repo_id, filename,
cache_dir=get_resource_path())``: into its own package folder, in Hugging Face's cache layout
(``models--py-feat--NAME/refs/main`` holds a revision, the file is
``models--py-feat--NAME/snapshots/<revision>/FILE``). The first use therefore needs internet.
``extract.visual.pyfeat_weights`` (``--pyfeat-weights DIR``) names another folder with that layout,
filled once on a machine with internet (:func:`download_command`), so extraction runs offline.

Nothing here imports py-feat at module level: the checks run before the detector is built.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

from ..errors import DependencyError

# Hugging Face repo -> files Detectorv1 (retinaface, mobilefacenet, xgb, resmasknet) reads, and the
# landmark pose MLP its forward() loads on first use (without it py-feat leaves the pose NaN).
REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    "py-feat/retinaface_r34": ("model.safetensors",),
    "py-feat/mobilefacenet": ("mobilefacenet_model_best.pth.tar",),
    "py-feat/xgb_au": ("xgb_au_classifier_v2.skops",),
    "py-feat/resmasknet": ("config.json", "ResMaskNet_Z_resmasking_dropout1_rot30.pth"),
    "py-feat/pose_mlp_v2": ("pose_mlp_v2.safetensors", "pose_mlp_v2.json"),
}


WEIGHTS_ENV = "ALMT_PYFEAT_WEIGHTS"  # a weights folder that overrides the config's, for any command


def repo_folder(cache: str | os.PathLike, repo: str) -> Path:
    return Path(cache) / f"models--{repo.replace('/', '--')}"


def cached_file_path(cache: str | os.PathLike, repo: str, filename: str, revision: str | None = None) -> Path:
    """Where ``hf_hub_download`` finds ``repo``'s ``filename`` in ``cache`` (``revision``: the
    one ``refs/main`` names)."""
    folder = repo_folder(cache, repo)
    if revision is None:
        try:
            revision = (folder / "refs" / "main").read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            revision = "(no refs/main)"
    return folder / "snapshots" / revision / filename


def missing_files(cache: str | os.PathLike) -> list[tuple[str, str]]:
    """The (repo, file) pairs of :data:`REQUIRED_FILES` that ``cache`` lacks."""
    return [(repo, name) for repo, names in REQUIRED_FILES.items() for name in names
            if not cached_file_path(cache, repo, name).is_file()]


def package_weights_folder() -> Path | None:
    """py-feat's own weights folder (``feat/resources``), found without importing py-feat."""
    try:
        spec = importlib.util.find_spec("feat")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "resources"


def hub_offline() -> bool:
    """True when huggingface_hub may not use the network: ``HF_HUB_OFFLINE`` set now (its own
    rule for true values) or when huggingface_hub was imported (it reads the variable once)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    constants = sys.modules.get("huggingface_hub.constants")
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def download_command(missing: list[tuple[str, str]], folder: str) -> str:
    """One shell line that fetches ``missing`` into ``folder`` (``hf``: huggingface_hub's CLI)."""
    by_repo: dict[str, list[str]] = {}
    for repo, name in missing:
        by_repo.setdefault(repo, []).append(name)
    return " && ".join(f"hf download {repo} {' '.join(names)} --cache-dir {shlex.quote(folder)}"
                       for repo, names in by_repo.items())


def missing_message(missing: list[tuple[str, str]], folder: Path | None, why: str) -> str:
    """The one line naming what is missing, where, and how to get it."""
    files = ", ".join(f"{repo}/{name}" for repo, name in missing)
    if folder is None:  # py-feat's package folder
        where, target = "py-feat's package folder", "DIR"
        then = (f"copy DIR to this machine and pass --pyfeat-weights DIR (config: extract.visual.pyfeat_weights; "
                f"any command: {WEIGHTS_ENV}=DIR)")
    else:
        where, target = str(folder), str(folder)
        then = f"or copy that folder here from a machine that has it (or set {WEIGHTS_ENV}=DIR)"
    return (f"py-feat weights missing from {where}: {files} ({why}); on a machine with internet run "
            f"once: {download_command(missing, target)}; {then}")


def check_weights(folder: Path | None) -> list[tuple[str, str]]:
    """The files missing from ``folder`` (None: py-feat's package folder). Raises a
    :class:`DependencyError` when some are missing and the hub may not be used; returns them
    otherwise (py-feat then downloads them into the folder)."""
    if folder is not None and folder.exists() and not folder.is_dir():
        raise DependencyError(f"--pyfeat-weights {folder}: not a folder")
    cache = folder if folder is not None else package_weights_folder()
    if cache is None:  # py-feat is not installed: its import reports that
        return []
    missing = missing_files(cache)
    if missing and hub_offline():
        raise DependencyError(missing_message(missing, folder, "HF_HUB_OFFLINE is set, so nothing is downloaded"))
    return missing


@contextlib.contextmanager
def weights_from(folder: Path | None) -> Iterator[None]:
    """While the models load, make py-feat read (and download) its weights in ``folder``.

    py-feat passes ``cache_dir=get_resource_path()`` to every ``hf_hub_download``, so the name
    ``get_resource_path`` is what is redirected, in the two places py-feat looks it up:
    ``feat.detector`` (imported by name there: the landmark, AU and emotion models) and
    ``feat.utils.io`` (imported inside the function at call time by RetinaFace and the pose MLP).
    Only for the duration of the block: py-feat's other resources (CSV/JSON files in its package
    folder) are read at import time, before it. The other ways are worse: ``HF_HUB_CACHE`` is
    ignored because py-feat passes ``cache_dir`` explicitly, and copying weights into the package
    folder writes into site-packages.
    """
    if folder is None:
        yield
        return
    import feat.detector
    import feat.utils.io

    def resource_path() -> str:
        return str(folder)

    saved = feat.detector.get_resource_path, feat.utils.io.get_resource_path
    feat.detector.get_resource_path = feat.utils.io.get_resource_path = resource_path
    try:
        yield
    finally:
        feat.detector.get_resource_path, feat.utils.io.get_resource_path = saved


__all__ = ["REQUIRED_FILES", "WEIGHTS_ENV", "cached_file_path", "check_weights", "download_command", "hub_offline",
           "missing_files", "missing_message", "package_weights_folder", "weights_from"]
