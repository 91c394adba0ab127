"""Corpora, tokenizer, tokenized datasets and packed batches for training."""

from .corpus import Document, load_documents, split_documents
from .dataset import Dataset, TokenSplit, load_dataset, prepare_dataset, write_dataset
from .packing import PackedBatch, PackedDocuments
from .tokenizer import EOS, bits_per_byte, encode_documents, read_tokenizer, token_byte_lengths, train_tokenizer

__all__ = ["EOS", "Dataset", "Document", "PackedBatch", "PackedDocuments", "TokenSplit", "bits_per_byte",
           "encode_documents", "load_dataset", "load_documents", "prepare_dataset", "read_tokenizer", "split_documents",
           "token_byte_lengths", "train_tokenizer", "write_dataset"]
