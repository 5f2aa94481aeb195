"""Lightning DataModules for language-model training."""

from datamodules.corpus import default_corpus_files
from datamodules.text import TextDataModule

__all__ = ["TextDataModule", "default_corpus_files"]
