"""Models of the cascade. Importing this package registers every custom object (layers, losses,
the two online augmentation layers, the sequence stage's layers) so that
`keras.saving.load_model("stage2.keras")` works in a fresh process; `import ich` arranges that
this happens as soon as Keras is imported."""

from ich.models import losses  # noqa: F401  (registers WeightedBCE)
from ich.models import layers  # noqa: F401  (registers TokenEmbedding)
from ich.models import warp  # noqa: F401  (registers RandomWarp: in checkpoints that train with it)
from ich.models import intensity  # noqa: F401  (registers RandomIntensity, likewise)
from ich.models import sequence  # noqa: F401  (registers the sequence stage's masked layers)
