"""Offline DDPM forward process: WebDataset shards in, validated Parquet training records out."""

__version__ = "0.1.0"
