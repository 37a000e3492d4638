"""Datasets: 2D toy generators, MAF tabular files, and image files.

Everything is returned as whole tensors, never per-row tuples, so a training
loop can index batches directly.
"""

from flows.datasets.errors import DatasetFileError
from flows.datasets.images import IMAGE_DATASETS, ImageData, load_image_dataset
from flows.datasets.tabular import TABULAR_DATASETS, TabularData, load_tabular
from flows.datasets.toy import TOY_DATASETS, toy_classification, toy_data

__all__ = [
    "IMAGE_DATASETS",
    "TABULAR_DATASETS",
    "TOY_DATASETS",
    "DatasetFileError",
    "ImageData",
    "TabularData",
    "load_image_dataset",
    "load_tabular",
    "toy_classification",
    "toy_data",
]
