"""Offline DDPM forward process: WebDataset shards in, validated Parquet training records out."""
