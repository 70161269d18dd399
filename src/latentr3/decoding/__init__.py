"""Catalogue-constrained decoding: the item trie and beam search."""
