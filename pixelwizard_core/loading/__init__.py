"""Weight files of every published layout, detected by their keys, and the umT5 tokenizer."""
