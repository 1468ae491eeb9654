"""A config file that reads a resolved config from JSON (a run's config.json, say).

    python -m smallfx.main --config=tools/json_config.py:PATH.json --workdir=DIR
"""
import json

import ml_collections


def get_config(path):
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))
