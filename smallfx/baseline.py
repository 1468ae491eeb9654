"""Non-deep baselines on the same split: what the network has to beat."""

import numpy as np

from smallfx.errors import unknown


def random_forest(dataset, seed: int = 0) -> float:
  from sklearn.ensemble import RandomForestClassifier  # pylint: disable=g-import-not-at-top
  flat = lambda s: s.images.reshape(len(s.images), -1).astype(np.float32) / 255.0
  forest = RandomForestClassifier(n_estimators=500, random_state=seed, n_jobs=-1)
  forest.fit(flat(dataset.train), dataset.train.labels)
  return float(np.mean(forest.predict(flat(dataset.test)) == dataset.test.labels))


BASELINES = {'random_forest': random_forest, 'none': None}


def run(name: str, dataset, seed: int = 0):
  """Test accuracy of baseline `name`, or None for 'none'."""
  if name not in BASELINES:
    raise unknown('baseline', name, BASELINES)
  fn = BASELINES[name]
  return None if fn is None else fn(dataset, seed)
