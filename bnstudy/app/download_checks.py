"""A TFDS download without a network fails in seconds, not after TFDS's minutes of retries, and leaves nothing
behind: one connection to the dataset's download host first, and a failed preparation's partial files removed."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

# Where TFDS downloads each dataset from (its builders' URLs); a dataset not named here is not checked.
DOWNLOAD_HOSTS = {"mnist": "storage.googleapis.com", "cifar10": "www.cs.toronto.edu"}
CONNECT_TIMEOUT_S = 10.0
PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")


def check_reachable(name: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """One TCP connection to the dataset's download host (not through a proxy: with one set, TFDS's own
    download is the test); raises DataUnavailableError saying what could not be reached."""
    host = DOWNLOAD_HOSTS.get(name)
    if host is None or any(os.environ.get(v) for v in PROXY_VARIABLES):
        return
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError as e:
        from bnstudy.app.data import DataUnavailableError, offline_hint

        raise DataUnavailableError(
            f"Could not download TFDS dataset '{name}' (dataset.download=true): {host}, where TFDS downloads it "
            f"from, cannot be reached ({type(e).__name__}: {e}). Check the internet connection, or point "
            f"`dataset.data_dir` at a folder holding a prepared '{name}/' (prepare it once on a connected "
            f"machine)." + offline_hint(name)
        ) from None


class Leftovers:
    """What a failed TFDS preparation of `name` leaves in its data_dir: partial downloads (`*.tmp.*` under
    downloads/) and the dataset's folder when it did not exist before and holds no file."""

    def __init__(self, root: Path, name: str):
        self.root, self.name = root, name
        self.had_folder = (root / name).exists()

    def remove(self) -> None:
        downloads = self.root / "downloads"
        partial = [*downloads.glob(f"{self.name}/**/*.tmp.*"), *downloads.glob(f"*{self.name}*.tmp.*")]
        for tmp in partial:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        for folder in (downloads / self.name, *([] if self.had_folder else [self.root / self.name])):
            if folder.is_dir() and not any(p.is_file() for p in folder.rglob("*")):
                shutil.rmtree(folder, ignore_errors=True)
