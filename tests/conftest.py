"""Test-wide setup and shared fixtures.

The Keras backend must be chosen before anything imports keras: torch is the default for the
suite (fastest to start on CPU); tests that need another backend run it in a subprocess.
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """The real DICOM folder (env ICH_SHARED_DATA, else ../shared/data beside the repo), or None."""
    candidates = [os.environ.get("ICH_SHARED_DATA"), REPO.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "real_dicom").is_dir():
            return Path(candidate)
    return None


@pytest.fixture
def real_dicom_dir() -> Path:
    """Path of shared/data/real_dicom; skips the test with a reason where it is absent."""
    root = shared_data_dir()
    if root is None:
        pytest.skip("real DICOM files not found: set ICH_SHARED_DATA or place ../shared/data beside the repo")
    return root / "real_dicom"
