"""Datasets: loaders for each on-disk format, the embedded default, the downloader and the device loader."""

from genserve.training.data.errors import DatasetError, DatasetMissingError
from genserve.training.data.registry import DATASETS, load_dataset, resolve_data_dir
from genserve.training.data.types import ImageDataset

__all__ = ["DATASETS", "DatasetError", "DatasetMissingError", "ImageDataset", "load_dataset", "resolve_data_dir"]
