"""Datasets: loaders, splits/subsets, the row contract and image decoding."""
from engine.data.dataset import ROW_SCHEMA, DatasetError, ImageDataset, make_table
from engine.data.images import BadImageError, decode, encode_png, to_array
from engine.data.loaders import load_dataset

__all__ = ["ROW_SCHEMA", "BadImageError", "DatasetError", "ImageDataset", "decode", "encode_png",
           "load_dataset", "make_table", "to_array"]
