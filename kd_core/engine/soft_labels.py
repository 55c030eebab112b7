"""The teacher's soft labels of augmented epochs, stored once per (teacher, data, augmentation) and read back.

With ``dataset.augment`` the teacher must see each epoch's crops and flips, so the in-memory cache is off. But
the crops, flips and batch order are seeded by (seed, epoch, batch ``b``), so every run that shares the teacher,
the data and the seed feeds the teacher the same batch ``b`` of epoch ``e``. The first such run writes the
teacher's outputs of each completed epoch; later runs read them and do not run the teacher at all.

Layout, under ``soft_labels_root()/<key>/`` (key: :mod:`kd_core.engine.soft_label_key`):

* ``epoch_0003.safetensors`` per completed epoch: ``batch_sizes`` (int64 ``[B]``) and either ``logits``
  (float32 ``[N, C]``, the batches concatenated in order) or, for a top-k store, ``probs`` (float32 ``[N, k]``,
  softmax at T=1) with ``indices`` (int32 ``[N, k]``) and ``tail`` (float32 ``[N]``, the probability outside the
  top k, summed directly: 1 - sum(probs) would lose it to rounding when the teacher is confident). Written under a temporary name, then renamed (atomic).
* ``manifest.json``: the key's fields, the format, num_classes, batches per epoch (and their sizes) and, per complete epoch, its
  file's SHA-256. An epoch is readable only once it is listed there, after its file was renamed into place.

Reading never unpickles (safetensors only) and checks the manifest's fields, the file's hash, and every
tensor's name, dtype and shape; anything else is :class:`StoreUnreadable` and the caller runs the teacher live.

Top-k reconstruction (:func:`reconstruct_logits`): the kept probabilities p_i (i in the top k) are kept; the
remaining mass r (``tail``) is spread evenly over the other C - k classes; the logits handed to the losses
are log q (floored at 1e-12). Softmax at T=1 of these is exactly q; at temperature T the kept classes keep
their exact ratios (log p_i = z_i - logsumexp z) and the tail becomes flat. Losses that read raw logit values
(not shift-invariant) see z_i - logsumexp z instead of z_i. A flat tail costs accuracy, more at a high KD
temperature: softmax(log q / T) takes the 1/T-th power of the tail's mean probability, which (Jensen) gives the tail far more
tempered mass than the many tiny probabilities it replaces. Measured (bench/throughput.py, 200 classes, top-10):
-5.1 points at T=1, -23.8 at T=4. Full logits lose nothing (bit-identical).
Storing top-k soft labels with the rest spread evenly follows the label compression of FKD (Shen & Xing, "A Fast
Knowledge Distillation Framework for Visual Recognition", ECCV 2022), which stores ImageNet soft labels once too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from kd_core.engine.soft_label_key import store_key

FULL_LOGITS_MAX_CLASSES = 100  # at most this many classes, logits are small enough to keep whole (top_k is not used)
TAIL_FLOOR = 1e-12  # the smallest reconstructed probability: log(0) would make KL terms NaN
MANIFEST = "manifest.json"
MANIFEST_VERSION = 2  # 2: top-k stores keep the tail mass


class StoreUnreadable(Exception):
    """A stored epoch that cannot be used as it is; the message says why (shown with the live fallback)."""


def storage_format(num_classes: int, top_k: int | None) -> dict[str, Any]:
    """Full float32 logits, or the top ``top_k`` probabilities when set and the classes exceed 100."""
    if top_k is None or num_classes <= FULL_LOGITS_MAX_CLASSES:
        return {"format": "logits"}
    return {"format": "topk", "k": int(top_k)}


def compress_top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` largest softmax probabilities (float32) of each row, their class indices (int32) and the rest's sum."""
    all_probs = torch.softmax(logits.float(), dim=1)
    probs, indices = all_probs.topk(k, dim=1)
    tail = all_probs.scatter(1, indices, 0.0).sum(1)
    return probs, indices.to(torch.int32), tail


def reconstruct_logits(probs: torch.Tensor, indices: torch.Tensor, num_classes: int, tail: torch.Tensor | None = None) -> torch.Tensor:
    """Logits whose softmax keeps the top-k probabilities and spreads ``tail`` (default 1 - their sum) evenly."""
    k = probs.shape[1]
    tail = (1 - probs.sum(1)) if tail is None else tail
    rest = tail.clamp_min(0)[:, None] / max(num_classes - k, 1)
    full = rest.expand(len(probs), num_classes).clone()
    full.scatter_(1, indices.long(), probs)
    return full.clamp_min(TAIL_FLOOR).log()


@dataclass
class EpochLabels:
    """One stored epoch read back, on the training device: the teacher's logits of batch ``b``."""

    tensors: dict[str, torch.Tensor]
    offsets: list[int]
    num_classes: int

    def batch(self, b: int) -> torch.Tensor:
        rows = slice(self.offsets[b], self.offsets[b + 1])
        if "logits" in self.tensors:
            return self.tensors["logits"][rows]
        t = self.tensors
        return reconstruct_logits(t["probs"][rows], t["indices"][rows], self.num_classes, t["tail"][rows])


class SoftLabelStore:
    """The folder of one key: writes completed epochs, reads them back after checking them."""

    def __init__(self, root: Path, fields: dict[str, Any], num_classes: int, batch_sizes: list[int]) -> None:
        self.fields = fields
        self.key = store_key(fields)
        self.folder = Path(root) / self.key
        self.num_classes = num_classes
        self.batch_sizes = [int(n) for n in batch_sizes]
        self.storage: dict[str, Any] = fields["storage"]

    @property
    def top_k(self) -> int | None:
        return self.storage.get("k") if self.storage["format"] == "topk" else None

    def _expected_manifest(self) -> dict[str, Any]:
        return {"version": MANIFEST_VERSION, "key": self.key, "fields": self.fields, "format": self.storage["format"],
                "top_k": self.top_k, "num_classes": self.num_classes, "batches_per_epoch": len(self.batch_sizes),
                "batch_sizes": self.batch_sizes}

    def manifest(self) -> dict[str, Any]:
        """The manifest on disk when it is this key's; an empty one (no complete epoch) when absent or foreign."""
        expected = {**self._expected_manifest(), "epochs": {}}
        try:
            found = json.loads((self.folder / MANIFEST).read_text())
        except (OSError, ValueError):
            return expected
        if not isinstance(found, dict):
            return expected
        header = {k: found.get(k) for k in expected if k != "epochs"}
        # a JSON round trip, so tuples and lists compare equal
        if json.loads(json.dumps(header)) != json.loads(json.dumps(self._expected_manifest())):
            return expected
        epochs = found.get("epochs")
        return {**expected, "epochs": epochs if isinstance(epochs, dict) else {}}

    def complete_epochs(self) -> list[int]:
        return sorted(int(e) for e in self.manifest()["epochs"] if str(e).isdigit())

    # ---- writing

    def encode(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """One batch of the teacher's float32 logits in this store's format (kept on the device until written)."""
        if self.top_k is None:
            return {"logits": logits.detach().float()}
        probs, indices, tail = compress_top_k(logits.detach(), self.top_k)
        return {"probs": probs, "indices": indices, "tail": tail}

    def decode(self, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the losses see of an encoded batch: the logits, or their top-k reconstruction."""
        return EpochLabels(encoded, [0, len(next(iter(encoded.values())))], self.num_classes).batch(0)

    def write_epoch(self, epoch: int, batches: list[dict[str, torch.Tensor]]) -> Path:
        """Write a complete epoch (every batch, in order) atomically, then list it in the manifest."""
        if [len(next(iter(b.values()))) for b in batches] != self.batch_sizes:
            raise ValueError(f"epoch {epoch}: the batches recorded do not match the epoch's {len(self.batch_sizes)} batches")
        tensors = {name: torch.cat([b[name] for b in batches]).cpu().contiguous() for name in batches[0]}
        tensors["batch_sizes"] = torch.tensor(self.batch_sizes, dtype=torch.int64)
        data = safetensors.torch.save(tensors, metadata={"key": self.key, "epoch": str(epoch), "format": self.storage["format"]})
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"epoch_{epoch:04d}.safetensors"
        with self._locked():  # concurrent runs of the same key: each file and its manifest entry land together
            _atomic_write(path, data)
            manifest = self.manifest()
            manifest["epochs"][str(epoch)] = {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            _atomic_write(self.folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        return path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.folder / ".lock", "a") as handle:
            try:
                import fcntl
            except ImportError:  # not POSIX: a lost manifest entry only means that epoch is computed again later
                yield
                return
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # ---- reading

    def read_epoch(self, epoch: int, device: torch.device | str = "cpu") -> EpochLabels:
        """The stored epoch, checked against the manifest; :class:`StoreUnreadable` when it is absent or wrong."""
        entry = self.manifest()["epochs"].get(str(epoch))
        if not isinstance(entry, dict) or entry.get("file") != f"epoch_{epoch:04d}.safetensors":
            raise StoreUnreadable(f"epoch {epoch} is not complete in the store")
        try:
            data = (self.folder / entry["file"]).read_bytes()
        except OSError as exc:
            raise StoreUnreadable(f"epoch {epoch}: cannot read {entry['file']} ({exc.__class__.__name__})") from None
        if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise StoreUnreadable(f"epoch {epoch}: {entry['file']} does not match its SHA-256 in the manifest (corrupted or replaced)")
        try:
            tensors = safetensors.torch.load(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure means "not usable"
            raise StoreUnreadable(f"epoch {epoch}: {entry['file']} is not a valid safetensors file ({exc})") from None
        self._check(epoch, tensors)
        offsets = [0, *torch.tensor(self.batch_sizes).cumsum(0).tolist()]
        return EpochLabels({k: v.to(device) for k, v in tensors.items() if k != "batch_sizes"}, offsets, self.num_classes)

    def _check(self, epoch: int, tensors: dict[str, torch.Tensor]) -> None:
        n, k = sum(self.batch_sizes), self.top_k
        expected = {"batch_sizes": (torch.int64, (len(self.batch_sizes),))}
        if k is None:
            expected["logits"] = (torch.float32, (n, self.num_classes))
        else:
            expected.update(probs=(torch.float32, (n, k)), indices=(torch.int32, (n, k)), tail=(torch.float32, (n,)))
        found = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
        if found != expected:
            raise StoreUnreadable(f"epoch {epoch}: tensors {found} do not match the manifest's {expected}")
        if tensors["batch_sizes"].tolist() != self.batch_sizes:
            raise StoreUnreadable(f"epoch {epoch}: its batch sizes differ from this run's")
        values = [tensors["logits"]] if k is None else [tensors["probs"], tensors["tail"]]
        if not all(bool(torch.isfinite(v).all()) for v in values):
            raise StoreUnreadable(f"epoch {epoch}: non-finite values")
        if k is not None and not bool(((tensors["indices"] >= 0) & (tensors["indices"] < self.num_classes)).all()):
            raise StoreUnreadable(f"epoch {epoch}: class indices outside 0..{self.num_classes - 1}")


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
