"""Corpora, tokenizer and batches for training."""

from .batches import train_batch, validation_batches
from .corpus import Document, load_documents, split_documents
from .dataset import Dataset, prepare_dataset
from .tokenizer import EOS, bits_per_byte, encode_documents, token_byte_lengths, train_tokenizer

__all__ = ["EOS", "Dataset", "Document", "bits_per_byte", "encode_documents", "load_documents",
           "prepare_dataset", "split_documents", "token_byte_lengths", "train_batch", "train_tokenizer",
           "validation_batches"]
