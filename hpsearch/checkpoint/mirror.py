"""A trial's files on a shared store: mirrored as they are written, fetched back to resume.

With ``artifacts.shared`` (the default for a boto3 store or a filesystem store with its own
``path``), each file of a trial's folder that matters beyond its node (its checkpoints,
``manifest.json`` and the resume state ``last.pt``) is also written to the study's artifact
store, as ``<key>.<file name>``. The key is new for each trial and recorded as its
``store_key`` user attribute, so any node finds the files of any trial: a retry on another
node (whose results folder lacks the dead node's files) fetches its predecessor's, and
retention on any node deletes a trial's files from the store.

The mirror is written on the trial's background writer thread, after the local files. A
checkpoint goes to the store after a manifest that names it, so the stored manifest may name
a checkpoint not written yet but never misses one: deleting what it names (and the resume
state) deletes all of a trial's files, even of a trial killed mid-write.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial

from hpsearch import attrs
from hpsearch.checkpoint.artifacts import fetch_artifact
from hpsearch.files import atomic_write_json
from hpsearch.optuna_private import ArtifactStore
from hpsearch.results import MANIFEST, RESUME_STATE


class TrialMirror:
    """One trial's files in an artifact store, under the trial's key.

    Args:
        store: The study's (shared) artifact store.
        key: The trial's ``store_key``: every object id of its files starts with it.
    """

    def __init__(self, store: ArtifactStore, key: str) -> None:
        self.store, self.key = store, key

    @classmethod
    def start(cls, store: ArtifactStore, trial: optuna.Trial) -> TrialMirror:
        """A new key for a trial that starts running, recorded on the trial."""
        # Unique even where a study name and trial number recur (a rerun on the same bucket).
        key = f"trial{trial.number}-{uuid.uuid4().hex[:16]}"
        trial.set_user_attr(attrs.STORE_KEY, key)
        return cls(store, key)

    @classmethod
    def of(cls, store: ArtifactStore, trial: FrozenTrial) -> TrialMirror | None:
        """The mirror of a trial that recorded one, else None."""
        key = trial.user_attrs.get(attrs.STORE_KEY)
        return cls(store, str(key)) if key else None

    def object_id(self, name: str) -> str:
        """The store's id of the trial's file ``name``."""
        return f"{self.key}.{name}"

    def put(self, path: Path) -> None:
        """Write the local file ``path`` to the store under its name."""
        with open(path, "rb") as f:
            self.store.write(self.object_id(path.name), f)

    def remove(self, name: str) -> None:
        with contextlib.suppress(ArtifactNotFound):
            self.store.remove(self.object_id(name))

    def fetch(self, name: str, dest: Path) -> bool:
        """Download the trial's file ``name`` to ``dest`` (atomically); False if absent."""
        return fetch_artifact(self.store, self.object_id(name), dest)

    def stored_manifest(self) -> dict[str, Any] | None:
        """The trial's manifest as the store holds it, or None."""
        try:
            reader = self.store.open_reader(self.object_id(MANIFEST))
        except ArtifactNotFound:
            return None
        with contextlib.closing(reader):
            return dict(json.loads(reader.read()))

    def names(self) -> list[str]:
        """Every file of the trial the store may hold: the manifest's, the manifest itself
        and the resume state."""
        manifest = self.stored_manifest() or {}
        files = manifest.get("files", {})
        return [*sorted(files if isinstance(files, dict) else {}), MANIFEST, RESUME_STATE]

    def fetch_folder(self, folder: Path) -> list[str]:
        """Bring the trial's stored files into ``folder`` (its folder on this node): the
        checkpoints its manifest names, the manifest, and the resume state.

        Returns:
            The names of the files fetched.
        """
        manifest = self.stored_manifest()
        fetched = []
        if manifest is not None:
            files = manifest.get("files", {})
            for name in sorted(files):
                if self.fetch(name, folder / name):
                    fetched.append(name)
            # Written last, naming only what arrived: a local manifest never names a file the
            # folder lacks (one killed mid-upload is trained again).
            manifest = {**manifest, "files": {n: files[n] for n in fetched}}
            atomic_write_json(folder / MANIFEST, manifest, durable=False)
            fetched.append(MANIFEST)
        if self.fetch(RESUME_STATE, folder / RESUME_STATE):
            fetched.append(RESUME_STATE)
        return fetched

    def remove_all(self) -> None:
        """Delete every file of the trial from the store (the manifest last)."""
        names = self.names()
        for name in [n for n in names if n != MANIFEST] + [MANIFEST]:
            self.remove(name)
