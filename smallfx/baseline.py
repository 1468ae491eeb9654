"""Non-deep baselines on the same split: what the network has to beat."""

import numpy as np

from smallfx.errors import UserError, unknown


def random_forest(dataset, seed: int = 0) -> float:
  from sklearn.ensemble import RandomForestClassifier  # pylint: disable=g-import-not-at-top
  flat = lambda s: s.images.reshape(len(s.images), -1).astype(np.float32) / 255.0
  forest = RandomForestClassifier(n_estimators=500, random_state=seed, n_jobs=-1)
  forest.fit(flat(dataset.train), dataset.train.labels)
  return float(np.mean(forest.predict(flat(dataset.test)) == dataset.test.labels))


def logistic_features(dataset, seed: int = 0, features=None) -> float:
  """Logistic regression on a frozen pretrained backbone's pooled features."""
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from sklearn.preprocessing import StandardScaler  # pylint: disable=g-import-not-at-top
  if features is None:
    raise UserError("baseline 'logistic_features' needs pretrained weights: set "
                    '--config.pretrained')
  scaler = StandardScaler().fit(features(dataset.train.images))
  probe = LogisticRegression(max_iter=2000, C=1.0, random_state=seed)
  probe.fit(scaler.transform(features(dataset.train.images)), dataset.train.labels)
  predicted = probe.predict(scaler.transform(features(dataset.test.images)))
  return float(np.mean(predicted == dataset.test.labels))


BASELINES = {'random_forest': random_forest, 'logistic_features': logistic_features,
             'none': None}


def run(name: str, dataset, seed: int = 0, features=None):
  """Test accuracy of baseline `name`, or None for 'none'.

  `features` maps uint8 images to pooled features of the pretrained backbone,
  where the run has one.
  """
  if name not in BASELINES:
    raise unknown('baseline', name, BASELINES)
  if name == 'logistic_features':
    return logistic_features(dataset, seed, features)
  fn = BASELINES[name]
  return None if fn is None else fn(dataset, seed)
