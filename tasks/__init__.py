"""SeqIO Tasks and Mixtures for sbs-jax (registered on import; no files, gin or network touched).

Names and what they yield: see tasks/registry.py. Data folder and vocabulary are resolved when
a task is read: see tasks/config.py (`set_data_dir`, `set_vocabulary_path`, gin
`tasks.data_config`, env SBS_DATA_DIR / SBS_VOCAB).
"""

# First, so seqio loads TF quietly and with GPUs hidden from it.
from sbs_jax.runtime import tf_setup  # noqa: F401
from tasks.config import data_dir, get_vocabulary, set_data_dir, set_vocabulary_path
from tasks.registry import LABEL_PREFIX, RATIONALE_PREFIX, register_all

register_all()

__all__ = [
           "LABEL_PREFIX",
           "RATIONALE_PREFIX",
           "data_dir",
           "get_vocabulary",
           "register_all",
           "set_data_dir",
           "set_vocabulary_path",
]
