"""Split files, catalogues, the embedded MovieLens-100K default, prompts."""
