"""Tiny offline wheels named tensorflow and keras, so the box's venv build can be tested
without downloading 3 GB (tests reach no internet). They answer the trainer's check only."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

FAKE_TF = '''__version__ = "0.0+fake"


class config:  # mirrors tf.config
    @staticmethod
    def list_physical_devices(kind=None):
        return []
'''
FAKE_KERAS = '__version__ = "0.0+fake"\n'


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode().rstrip("=")
    return f"{name},sha256={digest},{len(data)}"


def build(directory: Path, name: str, source: str) -> Path:
    """A pure-Python wheel holding one module, installable with pip --no-index."""
    version = "0.0+fake"
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": source.encode(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: dlbox-tests\nRoot-Is-Purelib: true\n"
                         b"Tag: py3-none-any\n",
    }
    record = "\n".join([*(_record_line(n, d) for n, d in files.items()), f"{dist}/RECORD,,"])
    path = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for file_name, data in files.items():
            zf.writestr(file_name, data)
        zf.writestr(f"{dist}/RECORD", record + "\n")
    return path


def build_all(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    build(directory, "tensorflow", FAKE_TF)
    build(directory, "keras", FAKE_KERAS)
    return directory
