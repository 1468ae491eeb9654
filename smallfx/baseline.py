"""Non-deep baselines on the same split: what the network has to beat."""

import numpy as np

from smallfx.errors import UserError, unknown


def _pixels(images) -> np.ndarray:
  """Pixels in [0, 1], flattened; a table's (standardised) features as they are."""
  x = images.reshape(len(images), -1).astype(np.float32)
  return x / 255.0 if images.dtype == np.uint8 else x


def random_forest(train, seed: int = 0, features=None):
  del features
  from sklearn.ensemble import RandomForestClassifier  # pylint: disable=g-import-not-at-top
  forest = RandomForestClassifier(n_estimators=500, random_state=seed, n_jobs=-1)
  forest.fit(_pixels(train.images), train.labels)
  return lambda images: forest.predict(_pixels(images))


def gradient_boosting(train, seed: int = 0, features=None):
  """Histogram gradient-boosted trees (scikit-learn's defaults, early stopping off)."""
  del features
  from sklearn.ensemble import HistGradientBoostingClassifier  # pylint: disable=g-import-not-at-top
  trees = HistGradientBoostingClassifier(random_state=seed, early_stopping=False)
  trees.fit(_pixels(train.images), train.labels)
  return lambda images: trees.predict(_pixels(images))


def logistic_regression(train, seed: int = 0, features=None):
  """L2-regularised logistic regression (C=1) on the standardised pixels or features."""
  del features
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from sklearn.preprocessing import StandardScaler  # pylint: disable=g-import-not-at-top
  scaler = StandardScaler().fit(_pixels(train.images))
  model = LogisticRegression(max_iter=2000, C=1.0, random_state=seed)
  model.fit(scaler.transform(_pixels(train.images)), train.labels)
  return lambda images: model.predict(scaler.transform(_pixels(images)))


def logistic_features(train, seed: int = 0, features=None):
  """Logistic regression on a frozen pretrained backbone's pooled features."""
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from sklearn.preprocessing import StandardScaler  # pylint: disable=g-import-not-at-top
  if features is None:
    raise UserError("baseline 'logistic_features' needs pretrained weights: set "
                    '--config.pretrained')
  train_features = features(train.images)
  scaler = StandardScaler().fit(train_features)
  probe = LogisticRegression(max_iter=2000, C=1.0, random_state=seed)
  probe.fit(scaler.transform(train_features), train.labels)
  return lambda images: probe.predict(scaler.transform(features(images)))


BASELINES = {'random_forest': random_forest, 'gradient_boosting': gradient_boosting,
             'logistic_regression': logistic_regression,
             'logistic_features': logistic_features, 'none': None}


def fit(name: str, train, seed: int = 0, features=None):
  """Baseline `name` fitted on the split `train`: a function from images to labels.

  `features` maps uint8 images to pooled features of the pretrained backbone,
  where the run has one.
  """
  if name not in BASELINES or BASELINES[name] is None:
    raise unknown('baseline', name, [n for n, f in BASELINES.items() if f])
  return BASELINES[name](train, seed, features)


def accuracy(predict, split) -> float:
  return float(np.mean(predict(split.images) == split.labels))


def run(name: str, dataset, seed: int = 0, features=None):
  """Test accuracy of baseline `name` trained on `dataset.train`, or None for 'none'."""
  if name not in BASELINES:
    raise unknown('baseline', name, BASELINES)
  if BASELINES[name] is None:
    return None
  return accuracy(fit(name, dataset.train, seed, features), dataset.test)
