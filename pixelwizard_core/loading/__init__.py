"""Weight files of every published layout, detected by their keys, and the umT5 tokenizer.

Entry points: :func:`load_dit`, :func:`load_hr_dit`, :func:`load_vae`, :func:`load_t5`,
:func:`load_t5_tokenizer`, and :func:`inspect_weights` / :func:`inspect_folder` to describe files
without loading them.
"""

from .gguf import GGUFSource  # importing it registers the GGUF container with readers.open_file_source
from .inspection import WeightsInfo, inspect_folder, inspect_weights
from .load import load_dit, load_hr_dit, load_t5, load_t5_tokenizer, load_vae

__all__ = [
    "GGUFSource",
    "WeightsInfo",
    "inspect_folder",
    "inspect_weights",
    "load_dit",
    "load_hr_dit",
    "load_t5",
    "load_t5_tokenizer",
    "load_vae",
]
