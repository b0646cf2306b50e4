"""What a run was made with: run_dir/provenance.json, written when `train` has trained.

In: the config, the time the step started and ended, the command line. Out: a JSON dict with
the ich version, the git commit (when ich runs from a checkout), every installed distribution
and its version, the Keras backend with its devices (and CUDA / cuDNN where present), SHA-256
hashes of the labels CSV and splits.csv, the command line and the start and end times (UTC).
`settings_rows(run_dir)` gives the same as (name, value) rows for the report's settings table.

Paths written here are the config's own (relative as given); no patient data is recorded.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from ich.constants import SPLITS_CSV

PROVENANCE_JSON = "provenance.json"
HASH_CHUNK = 1 << 20  # bytes read at a time: the RSNA labels CSV is ~120 MB


def sha256(path: str | Path) -> str | None:
    """Hex SHA-256 of a file's bytes, or None when it does not exist."""
    path = Path(path)
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def git_commit(start: Path | None = None) -> str | None:
    """The commit of the checkout ich's sources lie in (with "-dirty" when it has local
    changes), or None for an installed wheel or where git is absent."""
    here = Path(start or Path(__file__).resolve().parent)
    try:
        top = subprocess.run(["git", "-C", str(here), "rev-parse", "--show-toplevel"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        # Only a checkout that holds these sources: not some repository a venv happens to lie in.
        if not (Path(top) / "src" / "ich" / "__init__.py").is_file():
            return None
        commit = subprocess.run(["git", "-C", top, "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", top, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def packages() -> dict[str, str]:
    """{distribution name: version} of everything installed in this environment."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found[name] = dist.version
    return dict(sorted(found.items(), key=lambda item: item[0].lower()))


def devices() -> dict:
    """The active Keras backend, its devices and, where present, its CUDA and cuDNN versions."""
    from ich import backend

    name = backend.current()
    info: dict = {"backend": name, "devices": [], "cuda": None, "cudnn": None}
    if name == "torch":
        import torch

        info["devices"] = ["cpu"] + [f"cuda:{i} {torch.cuda.get_device_name(i)}"
                                     for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
        if torch.cuda.is_available() and torch.backends.cudnn.is_available():
            info["cudnn"] = str(torch.backends.cudnn.version())
    elif name == "jax":
        import jax

        info["devices"] = [str(d) for d in jax.devices()]
    elif name == "tensorflow":
        import tensorflow as tf

        info["devices"] = [d.name for d in tf.config.list_physical_devices()]
        build = tf.sysconfig.get_build_info()
        info["cuda"], info["cudnn"] = build.get("cuda_version"), build.get("cudnn_version")
    return info


def collect(cfg: dict, started: datetime, ended: datetime, argv: list[str] | None = None) -> dict:
    """The provenance record of a run of `cfg` between `started` and `ended` (see module doc)."""
    from ich import __version__

    work = Path(cfg["paths"]["work_dir"])
    return {
        "ich": __version__,
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": sys.platform,
        "command": list(sys.argv if argv is None else argv),
        "started": started.astimezone(timezone.utc).isoformat(timespec="seconds"),
        "ended": ended.astimezone(timezone.utc).isoformat(timespec="seconds"),
        **devices(),
        "inputs": {
            "labels_csv": {"path": cfg["paths"]["labels_csv"], "sha256": sha256(cfg["paths"]["labels_csv"])},
            "splits_csv": {"path": str(work / SPLITS_CSV), "sha256": sha256(work / SPLITS_CSV)},
        },
        "packages": packages(),
    }


def write(cfg: dict, run_dir: str | Path, started: datetime, ended: datetime,
          argv: list[str] | None = None) -> Path:
    """Write run_dir/provenance.json (atomically) and return its path."""
    from ich.io import write_json

    return write_json(collect(cfg, started, ended, argv), Path(run_dir) / PROVENANCE_JSON)


def read(run_dir: str | Path) -> dict | None:
    """The parsed run_dir/provenance.json, or None when the run has none (trained before it)."""
    path = Path(run_dir) / PROVENANCE_JSON
    if not path.is_file():
        return None
    return json.loads(path.read_text())


# Packages worth a row of their own in the report; the full list stays in provenance.json.
KEY_PACKAGES = ("keras", "torch", "jax", "tensorflow", "numpy", "pydicom")


def settings_rows(run_dir: str | Path) -> list[tuple[str, str]]:
    """(name, value) rows for the report's settings / model card table; [] without provenance."""
    record = read(run_dir)
    if record is None:
        return []
    rows = [("ich version", record["ich"]), ("git commit", record.get("git_commit") or "n/a (installed package)"),
            ("backend", record["backend"]), ("devices", ", ".join(record.get("devices") or []) or "n/a")]
    if record.get("cuda"):
        rows.append(("CUDA / cuDNN", f"{record['cuda']} / {record.get('cudnn') or 'n/a'}"))
    installed = record.get("packages", {})
    versions = [f"{name} {installed[name]}" for name in KEY_PACKAGES if name in installed]
    rows += [("packages", ", ".join(versions)),
             ("labels CSV sha256", (record["inputs"]["labels_csv"]["sha256"] or "missing")[:16]),
             ("splits.csv sha256", (record["inputs"]["splits_csv"]["sha256"] or "missing")[:16]),
             ("trained", f"{record['started']} to {record['ended']}"),
             ("command", " ".join(_shown(part, first=i == 0) for i, part in enumerate(record["command"])))]
    return rows


def _shown(part: str, first: bool) -> str:
    """A command-line word as the report shows it: the program's name, and absolute paths by
    their last part (reports leave the machine; folder names can name people)."""
    if first:
        return Path(part).name
    key, sep, value = part.partition("=")
    if sep and value.startswith("/"):
        return f"{key}=.../{Path(value).name}"
    return f".../{Path(part).name}" if part.startswith("/") else part
