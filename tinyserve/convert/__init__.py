"""Importers that turn other formats (llama2.c, GGUF, SentencePiece) into Hugging Face-named files."""
