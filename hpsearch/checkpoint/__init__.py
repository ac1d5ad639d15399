"""Checkpoints: each trial's files and manifest, the study best, retention, artifacts, loading.

Checkpoints hold tensors plus JSON-safe metadata, so ``torch.load(path, weights_only=True)``
reads them forever; each file's sha256 is recorded in a manifest (a trial folder's
``manifest.json``, or ``best/meta.json``), and "best" is never found by file time or name.
"""
