"""A store in a local folder: the embedded default, and what a PersistentVolume looks like."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fedllm.errors import FedllmError
from fedllm.files import TEMP_PREFIX, write_atomic
from fedllm.store.base import LOCAL_FILE_MODE, ObjectNotFound, Store, check_key


class LocalStore(Store):
    """Objects as files under ``root``; the folder is created on the first write."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.root_uri = self.root.as_uri()
        if self.root.exists() and not self.root.is_dir():
            raise FedllmError(f"{self.root_uri}: is a file; a store root must be a folder")

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def uri_of(self, key: str) -> str:
        key = check_key(key, folder=True)
        return (self.root / key).as_uri() if key else self.root_uri

    def put_bytes(self, key: str, data: bytes) -> None:
        write_atomic(self._path(key), data, mode=LOCAL_FILE_MODE)

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise ObjectNotFound(f"{self.uri_of(key)}: no such object") from e

    def put_file(self, local_path: str | os.PathLike, key: str) -> None:
        local_path = Path(local_path)
        if not local_path.is_file():
            raise FedllmError(f"{local_path}: no such file to upload to {self.uri_of(key)}")
        with open(local_path, "rb") as src:
            write_atomic(self._path(key), lambda f: shutil.copyfileobj(src, f, 1 << 20), mode=LOCAL_FILE_MODE)

    def get_file(self, key: str, local_path: str | os.PathLike) -> Path:
        path = self._path(key)
        local_path = Path(local_path)
        try:
            src = open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise ObjectNotFound(f"{self.uri_of(key)}: no such object") from e
        with src:
            write_atomic(local_path, lambda f: shutil.copyfileobj(src, f, 1 << 20), mode=LOCAL_FILE_MODE)
        return local_path

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        if prefix and (prefix.startswith("/") or ".." in prefix.split("/")):
            check_key(prefix)  # raises with the accepted form
        # Walk only the deepest folder the prefix names fully, then filter by string prefix.
        folder = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        if not folder.is_dir():
            return []
        keys = []
        for dirpath, _dirnames, filenames in os.walk(folder):
            for name in filenames:
                if name.startswith(TEMP_PREFIX):
                    continue
                key = (Path(dirpath) / name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        # Drop folders the delete left empty, as an object store has no empty folders.
        parent = path.parent
        while parent != self.root and parent.is_relative_to(self.root):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent
