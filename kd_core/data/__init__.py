"""Datasets: the registry (:mod:`.registry`), a run's splits (:mod:`.splits`), resident uint8 images on the
training device (:mod:`.images`) or image files streamed from disk (:mod:`.streaming`), batch order and
augmentation (:mod:`.batching`, :mod:`.augment`)."""

from kd_core.data.augment import augment_batch, augmentation_generator
from kd_core.data.batching import MIN_BATCH, batch_indices, image_batches, iterate, num_batches
from kd_core.data.images import ImageSet, Normalizer, ResidentImages
from kd_core.data.registry import DATASETS, FILES, DatasetInfo, DatasetUnavailable, RawImages, missing_files
from kd_core.data.splits import ClassSelection, DataSplits, LoaderChoice, load_dataset, num_classes_of, select_classes, selected_names

__all__ = [
    "DATASETS", "FILES", "MIN_BATCH", "ClassSelection", "DataSplits", "DatasetInfo", "DatasetUnavailable", "ImageSet", "LoaderChoice",
    "Normalizer", "RawImages", "ResidentImages", "augment_batch", "augmentation_generator", "batch_indices", "image_batches", "iterate", "load_dataset",
    "missing_files", "num_batches", "num_classes_of", "select_classes", "selected_names",
]
