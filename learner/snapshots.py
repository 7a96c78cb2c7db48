"""Versioned model snapshots on disk: safetensors weights plus a JSON manifest.

Why this shape: a snapshot must be safe to load (safetensors holds tensors
only, no pickled code), impossible to read half-written (each version is
written into a temporary directory and renamed into place, then LATEST is
replaced atomically), and self-describing (the manifest carries the version,
bags seen, the full model config and a checksum of the weights).

Layout::

    DIR/v00000012/model.safetensors
    DIR/v00000012/optimizer.safetensors   (optional: lets training resume exactly)
    DIR/v00000012/manifest.json
    DIR/LATEST                             ("v00000012")
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where weights are read or written: reading a manifest (genco status) needs no torch
    import torch

    from learner.model import GenCO

FORMAT = 1


class SnapshotError(RuntimeError):
    """A snapshot is missing, incomplete or fails its checksum."""


@dataclass(frozen=True)
class Manifest:
    version: int
    bags_seen: int
    steps: int
    created: float
    model_config: dict
    train_config: dict
    sha256: str
    format: int = FORMAT
    # ``genco train``'s learning curve (``offline.ProgressiveLogLoss.curve``), for ``genco report``; None where
    # the snapshot was written without one (the streaming learner, snapshots older than the field)
    progressive_logloss: dict | None = None
    # The readout that serves (``serving.READOUTS``) and each readout's calibrated sCTR on the explore slice,
    # {policy: {"sctr", "se", "bags"}}, as the learner's referee judged them (``learner.referee``); ``referee``
    # its state, to resume from. Snapshots older than the fields, and ``genco train``'s, serve genco.
    serving: str = "genco"
    estimates: dict | None = None
    referee: dict | None = None


@dataclass
class Snapshot:
    manifest: Manifest
    model: GenCO
    optimizer_state: dict[str, torch.Tensor] | None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _name(version: int) -> str:
    return f"v{version:08d}"


def model_from(model_config: dict, weights: dict[str, torch.Tensor]) -> GenCO:
    """A serving model (eval mode) of ``model_config`` holding ``weights``."""
    from learner.model import GenCO, ModelConfig

    model = GenCO(ModelConfig.from_dict(model_config))
    model.load_weights(weights)
    model.eval()
    return model


class SnapshotStore:
    """Writes and reads the snapshots of one directory; keeps the newest ``keep`` versions."""

    def __init__(self, directory: str | Path, keep: int = 3) -> None:
        self.directory = Path(directory)
        self.keep = keep

    def latest_version(self) -> int:
        """The newest complete version, 0 when there is none."""
        try:
            name = (self.directory / "LATEST").read_text().strip()
        except FileNotFoundError:
            return 0
        return int(name.removeprefix("v")) if name.startswith("v") and name[1:].isdigit() else 0

    def save(self, model: GenCO, *, version: int, bags_seen: int, steps: int, train_config: dict,
             optimizer_state: dict[str, torch.Tensor] | None = None,
             progressive_logloss: dict | None = None, serving: str = "genco", estimates: dict | None = None,
             referee: dict | None = None) -> Manifest:
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.directory))
        try:
            weights = staging / "model.safetensors"
            save_file({k: v.detach().contiguous() for k, v in model.weights().items()}, str(weights))
            if optimizer_state:
                save_file({k: v.contiguous() for k, v in optimizer_state.items()},
                          str(staging / "optimizer.safetensors"))
            manifest = Manifest(version, bags_seen, steps, time.time(), model.config.to_dict(), train_config,
                                _sha256(weights), progressive_logloss=progressive_logloss, serving=serving,
                                estimates=estimates, referee=referee)
            (staging / "manifest.json").write_text(json.dumps(manifest.__dict__, indent=1))
            final = self.directory / _name(version)
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        pointer = self.directory / ".LATEST.tmp"
        pointer.write_text(_name(version))
        os.replace(pointer, self.directory / "LATEST")
        self._prune(version)
        return manifest

    def manifest(self, version: int | None = None) -> Manifest:
        """A snapshot's manifest (the newest's by default), without loading its weights."""
        version = version or self.latest_version()
        if not version:
            raise SnapshotError(f"no snapshot in {self.directory}")
        folder = self.directory / _name(version)
        try:
            return Manifest(**json.loads((folder / "manifest.json").read_text()))
        except (OSError, ValueError, TypeError) as error:
            raise SnapshotError(f"{folder}: unreadable manifest ({error})") from error

    def load(self, version: int | None = None, with_optimizer: bool = False) -> Snapshot:
        from safetensors.torch import load_file

        manifest = self.manifest(version)
        folder = self.directory / _name(manifest.version)
        weights = folder / "model.safetensors"
        if not weights.exists() or _sha256(weights) != manifest.sha256:
            raise SnapshotError(f"{weights}: missing or checksum mismatch")
        model = model_from(manifest.model_config, load_file(str(weights)))
        optimizer = folder / "optimizer.safetensors"
        state = load_file(str(optimizer)) if with_optimizer and optimizer.exists() else None
        return Snapshot(manifest, model, state)

    def checkpoints(self) -> list[int]:
        """Versions that carry optimiser state (training can resume from them), oldest first."""
        return sorted(int(f.parent.name[1:]) for f in self.directory.glob("v*/optimizer.safetensors")
                      if f.parent.name[1:].isdigit())

    def _prune(self, newest: int) -> None:
        # The two newest checkpoints survive: a crash between writing one and recording it leaves
        # the learner resuming from the one before.
        protected = set(self.checkpoints()[-2:])
        for folder in self.directory.glob("v*"):
            version = int(folder.name[1:]) if folder.name[1:].isdigit() else None
            if version is not None and version <= newest - self.keep and version not in protected:
                shutil.rmtree(folder, ignore_errors=True)
