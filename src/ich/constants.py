"""Names shared by every step: label order, artifact file names, step order.

Outside scripts rely on these names; change one only with a migration note in the README.
"""

# Label order everywhere inside ich. The RSNA CSV lists `any` last: convert at the boundary.
LABELS = ("any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
SUBTYPES = LABELS[1:]
# Order of the six rows per image in stage_2_train.csv and in a submission.
RSNA_ORDER = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")

# Artifacts of steps 0-5, relative to paths.work_dir.
INDEX_PARQUET = "index.parquet"
INDEX_FAILURES_CSV = "index_failures.csv"
LABELS_CSV = "labels.csv"
SAMPLED_CSV = "sampled.csv"
DICOM_DIR = "dicom"
PNG_DIR = "png"
IMAGES_CSV = "images.csv"
FAILURES_CSV = "failures.csv"
MISSING_CSV = "missing.csv"
SPLITS_CSV = "splits.csv"
AUGMENTED_DIR = "augmented"
AUGMENTED_CSV = "augmented.csv"
PACKED_DIR = "packed"
RESOLVED_CONFIG = "config.resolved.yaml"

# Artifacts of train/evaluate, relative to paths.run_dir (a stage's model is <stage>.keras).
MODEL_SUFFIX = ".keras"
STAGE1_MODEL = "stage1" + MODEL_SUFFIX
STAGE2_MODEL = "stage2" + MODEL_SUFFIX
SEQUENCE_MODEL = "sequence" + MODEL_SUFFIX
# Kinds of stage in cascade.json: a model on one input image, or one over a series' slices.
IMAGE, SEQUENCE = "image", "sequence"
CASCADE_JSON = "cascade.json"
HISTORY_DIR = "history"
LOGS_DIR = "logs"
EVAL_DIR = "eval"
METRICS_JSON = "metrics.json"
PREDICTIONS_CSV = "predictions.csv"
REPORT_MD = "report.md"

# Prediction outputs (ich predict --out DIR).
SUBMISSION_CSV = "submission.csv"
STUDIES_CSV = "studies.csv"
SKIPPED_CSV = "skipped.csv"      # predict: files that are not axial CT image slices, and why

# The three splits of splits.csv, in order.
SPLITS = ("train", "val", "test")
# Keras backends ich runs on.
BACKENDS = ("torch", "jax", "tensorflow")

# Pipeline order for `ich run`.
STEPS = ("index", "sample", "copy", "preprocess", "split", "augment", "train", "evaluate")

# External data sets `ich evaluate --dataset NAME` reads (ich.data.datasets).
EXTERNAL_DATASETS = ("cq500", "rsna", "table")
