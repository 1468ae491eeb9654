"""The defaults every config starts from; `configs/*.py` change what they study."""

import importlib.util
import os

import ml_collections

# Scalar hyperparameters of the step that a sweep may vary (`--config.sweep.NAME=a,b`).
SWEEPABLE = ('learning_rate', 'weight_decay', 'momentum', 'label_smoothing',
             'cosine_xent_weight')


# The fields a run without `pretrain` never reads (a study cell's fingerprint leaves
# them out there, so records written before they existed still match).
PRETRAINING_FIELDS = ('pretrain', 'unlabelled', 'pretraining')
# ... and the fields a run without `generative` never reads.
GENERATIVE_FIELDS = ('generative', 'gan')
# Fields a study cell's fingerprint leaves out while they hold these defaults, for the
# same reason.
LATER_FIELDS = {'hierarchy': '', 'class_targets': 'onehot', 'label_column': '',
                'categorical': '', 'depth': 0, 'norm': 'none', 'dropout': 0.0}


def default() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Data. `samples_per_class` = 0 keeps the whole training pool.
  c.dataset = 'digits'
  c.data_dir = ''
  c.samples_per_class = 10
  c.val_per_class = 10
  c.data_seed = 0
  c.image_size = 0     # 0: native size; N or (H, W): resize on load.
  c.channels = 0       # 1: grey (colour sources are converted); 3: RGB; 0: the source's.
  c.max_image_pixels = 0  # folder datasets: Pillow's decompression-bomb limit (0: Pillow's).
  # Tables (`sklearn:NAME`, `csv:PATH`): the csv's label column, and its columns to
  # one-hot encode (comma-separated; every other column must be numeric).
  c.label_column = ''
  c.categorical = ''
  # Grammar in smallfx/augment.py; 'auto' picks by image size (`experiment.AUTO_AUGMENT`).
  c.augment = 'auto'

  # Model and loss.
  c.model = 'resnet20'
  c.width = 1.0
  # The MLP's (`model='mlp'`, 256 x width units per layer): layers (0: 2), 'none',
  # 'batch' or 'layer' norm, and the dropout rate after each layer.
  c.depth = 0
  c.norm = 'none'
  c.dropout = 0.0
  c.dtype = 'float32'
  c.loss = 'cosine'
  c.embedding_dim = 0  # 0: one output per class (one-hot cosine targets).
  # A class hierarchy (smallfx/hierarchy.py: `child parent` lines; hierarchies/ ships
  # some). Any run with one reports how severe its mistakes are; `class_targets=
  # 'hierarchy'` also trains the cosine losses towards Barz & Denzler's embedding of it.
  c.hierarchy = ''
  c.class_targets = 'onehot'
  # Fine-tuning: a workdir of tools/convert_torch.py (or of a run), or an
  # architecture whose weights a pip package ships (converted on the fly).
  c.pretrained = ''
  c.finetune = 'full'          # 'full' or 'linear' (frozen backbone).
  c.backbone_lr_mult = 0.1     # 'full': the backbone learns this much slower.
  c.freeze_bn = True           # keep the pretrained BatchNorm statistics.

  # Pretraining without labels (smallfx/pretrain.py): 'dae', 'stacked_ae' or 'simclr'
  # train the backbone on `unlabelled` images first, then fine-tuning as above
  # (`finetune`, `backbone_lr_mult`, `freeze_bn`) starts from it.
  c.pretrain = ''
  c.unlabelled = 'rest'  # the training pool beyond the labelled sub-sample(s), or 'folder:PATH'
  c.pretraining = ml_collections.ConfigDict({
      'steps': 1000,
      'batch_size': 128,
      'learning_rate': 0.0,    # AdamW, cosine decay after a warm-up; 0: the method's own
      'weight_decay': 1e-4,
      'warmup_steps': 50,
      'mask': 0.5,             # autoencoders: the fraction of pixels zeroed in the input
      'noise': 0.1,            # ... and Gaussian noise on the rest (normalised units)
      'augment': 'auto',       # simclr's views (smallfx/augment.py); 'auto': by image size
      'temperature': 0.5,      # simclr's NT-Xent
      'projection_dim': 64,    # simclr's projection head
      'checkpoint_every_steps': 500,
  })

  # Generative augmentation (smallfx/generative.py): 'dada' trains a class-conditional
  # GAN whose discriminator (the run's model, two outputs per class, loss 'dada') then
  # trains on as the classifier, on real and generated images; 'cgan_augment' trains
  # the GAN, then the run's own model and loss on real plus generated images.
  c.generative = ''
  c.gan = ml_collections.ConfigDict({
      'steps': 1000,           # phase 1: iterations of one discriminator step + g_steps
      'batch_size': 64,        # real images per iteration (as many generated)
      'learning_rate': 3e-4,   # Adam for both networks, DADA's
      'b1': 0.5,
      'g_steps': 2,            # generator steps per discriminator step (DADA: 2)
      'z_dim': 100,
      'width': 1.0,            # the generator's channels (1.0: 256, 128 at 28x28)
      'feature_matching': 0.5,  # weight of the generator's feature-matching term
      'input_noise': 0.2,      # Gaussian noise on the discriminator's input (normalised units)
      'ratio': 0.0,            # phase 2: generated images per real one; 0: the method's own
      'discriminator': '',     # cgan_augment: its backbone; '': the run's model
      # A class whose generated images vary less than this (mean pixel std, [0, 1]
      # units) stops the run as collapsed; Fashion-MNIST's real classes: 0.13-0.27.
      'min_spread': 0.01,
      'checkpoint_every_steps': 500,
      'sample_every_steps': 250,  # TensorBoard pictures of generated images
  })

  # Optimisation. Durations: `num_steps` if > 0, else `num_epochs` over the training
  # split, at most `max_steps` (0: no cap).
  c.batch_size = 32
  c.num_steps = 0
  c.num_epochs = 300.0
  c.max_steps = 0
  c.optimizer = 'sgd'
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.schedule = 'cosine'
  c.warmup_steps = 50
  c.sgdr_cycles = 3
  c.grad_clip_norm = 0.0
  c.label_smoothing = 0.1      # loss 'xent_smooth'.
  c.cosine_xent_weight = 0.1   # loss 'cosine_xent': Barz & Denzler's lambda.

  # A sweep: comma-separated values of any of these fields, e.g.
  # --config.sweep.learning_rate=0.03,0.1,0.3. Their product times `num_seeds` members
  # train as one program; the validation split chooses the setting.
  c.sweep = ml_collections.ConfigDict({name: '' for name in SWEEPABLE})

  # Seeds: `num_seeds` models of every setting train together as one program.
  c.seed = 0
  c.num_seeds = 1
  c.resample_per_seed = False
  # Devices along the members; the rest split the batch. 0: on CPU, members run side
  # by side on the cores (members.cpu_devices); elsewhere 1.
  c.member_devices = 0
  # Train steps per call of the compiled program; 0: by platform (smallfx/tuning.py).
  c.steps_per_dispatch = 0
  # CPU tuning (oneDNN convolutions, layer rewrites, the allocator): on by default on
  # CPU, never elsewhere. SMALLFX_CPU_TUNING=0 in the environment turns it off too.
  c.cpu_tuning = True
  c.distributed = False  # multi-host: jax.distributed.initialize() from the environment.

  # Bookkeeping.
  c.log_every_steps = 50
  c.eval_every_steps = 200
  c.checkpoint_every_steps = 500
  c.eval_batch_size = 500
  c.baseline = 'random_forest'
  c.progress = True
  return c


def study() -> ml_collections.ConfigDict:
  """The defaults every study config starts from (`python -m smallfx.study`)."""
  c = ml_collections.ConfigDict()
  # The experiment every method starts from: any `smallfx.main` config's fields,
  # overridable as --config.base.KEY=VALUE. Its own sweep and seeds are the study's.
  c.base = default()
  c.base.baseline = 'none'  # baselines are methods of their own
  c.base.progress = False
  # Samples per class (ascending, comma-separated), and methods by name
  # (--config.methods=help lists them).
  c.sizes = '10,25,50,100'
  c.methods = 'random_forest,xent,cosine,cosine+aug,ensemble'
  # The tuning grid every trained method gets (a method may bring a smaller one):
  # comma-separated values of any sweepable field.
  c.grid = ml_collections.ConfigDict({name: '' for name in SWEEPABLE})
  c.grid.learning_rate = '0.03,0.1,0.3'
  c.grid.weight_decay = '5e-5,5e-4,5e-3'
  # Seeds: the grid trains `tune_seeds` of each setting; the chosen setting then
  # trains `seeds` fresh ones (their own initialisations and training sub-samples),
  # which give the reported figures. `tune_seeds=0`: no retraining, the tuning run's
  # seeds of the chosen setting are reported (their choice then flatters them a little).
  c.seeds = 3
  c.tune_seeds = 1
  # Free text the report repeats under Setup: where the durations and pipelines come from.
  c.notes = ''
  return c


def sibling(config_file: str, name: str):
  """The config module `name`.py in the folder of `config_file`: for a config that
  builds on another (configs are files, not an importable package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f'{name}.py')
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
