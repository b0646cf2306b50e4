"""Export a trained cascade as one deployable graph: images in, the six probabilities out.

In: the two loaded stage models of a run and its cascade.json content. Out: a float32 Keras
model `cascade_model(stage1, stage2)` mapping images (N, S, S, C) in [0, 1], exactly as the
stages take them, to (N, 6) probabilities in LABELS order (p(any), then p(any) * p(subtype |
any), the same product as ich.evaluation.inference.combine), and the export's cascade.json:
the run's own description (input description, thresholds, backbones, versions) plus an
"export" entry naming the file, its format and its input and output tensors.
`ich.steps.export` does the loading, writing and checking.
"""

from __future__ import annotations

from ich.constants import LABELS

FORMATS = ("onnx", "saved_model")
ONNX_FILE = "cascade.onnx"
SAVED_MODEL_DIR = "saved_model"
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
# ONNX opset of the export: 18 is the oldest the torch dynamo exporter writes natively, and
# every onnxruntime since 1.14 runs it.
OPSET = 18


def cascade_model(models: dict, stages: list[dict]):
    """One functional keras.Model: images -> (N, 6) float32 probabilities in LABELS order.

    `stages` is cascade.json's list (name, labels, given); `models` maps each name to its
    keras.Model. Every stage sees the same input tensor; a stage conditional on a label gives
    p(label | given), multiplied by p(given), as ich.evaluation.inference.Cascade does. The
    stages are used as they are (no copy), so the export carries exactly the trained weights.
    """
    import keras

    shapes = {name: tuple(model.input_shape[1:]) for name, model in models.items()}
    shape = shapes[stages[0]["name"]]
    if len(set(shapes.values())) != 1:
        raise ValueError(f"the stages take different inputs {shapes}; the export feeds them one "
                         f"input: retrain them on one input description")
    images = keras.Input(shape=shape, dtype="float32", name=INPUT_NAME)
    columns = {}
    for stage in stages:
        p = models[stage["name"]](images)
        for j, label in enumerate(stage["labels"]):
            column = p[:, j:j + 1]
            columns[label] = column * columns[stage["given"]] if stage.get("given") else column
    probs = keras.layers.Concatenate(axis=-1, name=OUTPUT_NAME, dtype="float32")(
        [columns[label] for label in LABELS])
    return keras.Model(images, probs, name="cascade")


def export_description(meta: dict, fmt: str, file: str, input_shape: tuple, versions: dict,
                       max_abs_diff: float | None) -> dict:
    """The export folder's cascade.json: the run's `meta` with an "export" entry added.

    input_shape is one sample's shape (S, S, C). max_abs_diff is the largest difference between
    the export's and the Keras models' probabilities measured when exporting (None if not run).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    out = {key: value for key, value in meta.items() if key != "export"}
    # The graph holds the image stages; a sequence stage runs over whole series and stays in
    # the run (an export's studies are the maximum over their slices).
    from ich.constants import IMAGE
    from ich.evaluation.cascade_file import stage_kind

    out["stages"] = [s for s in meta["stages"] if stage_kind(s) == IMAGE]
    if "cascade_thresholds" in meta:      # chosen on val for the image stages' own output
        out["thresholds"] = dict(meta["cascade_thresholds"])
    out["export"] = {
        "format": fmt,
        "file": file,
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": [None, *map(int, input_shape)],
                  "range": [0.0, 1.0], "layout": "channels_last"},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "labels": list(LABELS),
                   "meaning": "p(any), then p(any) * p(subtype | any) per subtype"},
        "opset": OPSET if fmt == "onnx" else None,
        "versions": versions,
        "max_abs_diff_vs_keras": max_abs_diff,
        "not_exported": [s["name"] for s in meta["stages"] if stage_kind(s) != IMAGE],
    }
    return out
