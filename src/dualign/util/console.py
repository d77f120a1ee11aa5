"""Keep the console for progress bars and the final table: libraries' own progress bars and info logs off."""
from __future__ import annotations

import logging
import warnings

import datasets
from transformers.utils import logging as hf_logging


def quiet_libraries() -> None:
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)  # "Loading SentenceTransformer model from"
    logging.getLogger("huggingface_hub.repocard").setLevel(logging.ERROR)  # local embedding folders have no model card
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft asks transformers 5 the old way
    # a full-batch epoch is one step; Lightning still writes train/* every log_every_n_steps steps across epochs
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
