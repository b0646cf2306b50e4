"""Models of the cascade. Importing this package registers every custom object (layers, losses)
so that `keras.saving.load_model("stage2.keras")` works in a fresh process."""

from ich.models import losses  # noqa: F401  (registers WeightedBCE)
from ich.models import layers  # noqa: F401  (registers TokenEmbedding)
