"""The names users choose from: classifiers, splits, the paper's backbones.

One owner, imported by the stages that accept these names (tasks/train.py,
tasks/experiments.py) and by the command line, whose `--help` lists them as choices. It imports
nothing, so `leukoflow --help` does not load scikit-learn to print them.
"""

CLASSIFIERS = ("linear-svm", "rbf-svm", "knn", "tree", "forest", "mlp")
DEFAULT_CLASSIFIER = "linear-svm"  # the paper's
# The paper's five classical classifiers plus its MLP, in the order of its tables.
PAPER_CLASSIFIERS = ("knn", "linear-svm", "rbf-svm", "tree", "forest", "mlp")

# `rbf-svm-tuned` (tasks/train.py): the RBF SVM with C and gamma chosen by inner subject-grouped
# folds. A development choice of bench/cm_validate.py, not offered by the command line.
TUNED_CLASSIFIER = "rbf-svm-tuned"

SPLITS = ("random", "subject")
EXPERIMENT_SPLITS = (*SPLITS, "both")

# The screening threshold's target: the sensitivity for ALL it must reach on validation folds
# (tasks/calibration.py).
DEFAULT_TARGET_SENSITIVITY = 0.95

# Cross-validation (tasks/folds.py), for `validate`, `experiments` and the bench alike.
DEFAULT_FOLDS = 5
DEFAULT_BOOTSTRAP = 1000  # subject-bootstrap resamples of a 95% interval
DEFAULT_SEED = 0

# The paper's six backbones (Tables 2-3).
PAPER_BACKBONES = (
    "vgg16",
    "vgg19",
    "resnet101",
    "mobilenet_v2",
    "inception_resnet_v2",
    "densenet121",
)
