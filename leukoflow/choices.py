"""The names users choose from (classifiers, splits, the paper's backbones) and the defaults of
every setting the command line and the flows share (target sensitivity, folds, bootstrap, seed,
the sweep's chunk size, subject rule, drift thresholds and outputs, the dashboard, FHIR sending).
The feature recipe's own defaults (weights, image size, precision, batch size) are in recipe.py.

One owner, imported by the stages that accept these names (learn/train.py,
learn/experiments.py) and by the command line, whose `--help` lists them as choices. It imports
nothing, so `leukoflow --help` does not load scikit-learn to print them.
"""

CLASSIFIERS = ("linear-svm", "rbf-svm", "knn", "tree", "forest", "mlp")
DEFAULT_CLASSIFIER = "linear-svm"  # the paper's
# The paper's five classical classifiers plus its MLP, in the order of its tables.
PAPER_CLASSIFIERS = ("knn", "linear-svm", "rbf-svm", "tree", "forest", "mlp")

# `rbf-svm-tuned` (learn/train.py): the RBF SVM with C and gamma chosen by inner subject-grouped
# folds. A development choice of bench/cm_validate.py, not offered by the command line.
TUNED_CLASSIFIER = "rbf-svm-tuned"

SPLITS = ("random", "subject")
EXPERIMENT_SPLITS = (*SPLITS, "both")

# The screening threshold's target: the sensitivity for ALL it must reach on validation folds
# (learn/calibration.py).
DEFAULT_TARGET_SENSITIVITY = 0.95

# Cross-validation (learn/folds.py), for `validate`, `experiments` and the bench alike.
DEFAULT_FOLDS = 5
DEFAULT_BOOTSTRAP = 1000  # subject-bootstrap resamples of a 95% interval
DEFAULT_SEED = 0

# The run report's examples (present/explain.py): activation maps of up to this many true
# positives, false positives and false negatives of the held-out cells.
REPORT_EXAMPLES_PER_KIND = 3

# The nightly sweep (scoring/score.py): predictions per file, the subject rule used when the model
# has no patient rule of its own, and when drift becomes a warning.
SWEEP_CHUNK_SIZE = 256
MIN_FLAGGED_CELLS = 5  # a subject with this many flagged cells is flagged (0: off)
MIN_FLAGGED_FRACTION = 0.5  # ... or with more than this fraction of its cells flagged (1: off)
FEATURE_DRIFT_THRESHOLD = 1.0  # mean |z| of tonight's feature means against training
SCORE_DRIFT_THRESHOLD = 0.5  # KS distance of tonight's scores against the held-out reference
DRIFT_MIN_CELLS = 20  # fewer new cells: drift is shown, never a warning
INBOX_DATASET = "inbox"  # the catalog name of what a sweep scores
EXPLAIN_LIMIT = 100  # activation-map PNGs per sweep at most, with --explain-flagged

# What ops look at (present/dashboard.py, present/fhir.py).
DASHBOARD_NIGHTS = 60  # recent nights the dashboard's plots show
STALE_AFTER_HOURS = 36.0  # the dashboard's banner: no completed sweep for this long
# Sending FHIR: a transaction is all-or-nothing on the server, so a retry after a lost answer is
# safe; bounded, because a night's sweep must not hang on a FHIR server.
FHIR_SEND_TIMEOUT_S = 30.0  # per request
FHIR_SEND_ATTEMPTS = 3

# The paper's six backbones (Tables 2-3).
PAPER_BACKBONES = (
    "vgg16",
    "vgg19",
    "resnet101",
    "mobilenet_v2",
    "inception_resnet_v2",
    "densenet121",
)
