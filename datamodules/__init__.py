"""Lightning DataModules for language-model training."""

from datamodules.corpus import default_corpus_files
from datamodules.sparse_features import SparseFeatureDataModule
from datamodules.text import TextDataModule

__all__ = ["SparseFeatureDataModule", "TextDataModule", "default_corpus_files"]
