"""The defaults every config starts from; `configs/*.py` change what they study."""

import ml_collections


def default() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Data. `samples_per_class` = 0 keeps the whole training pool.
  c.dataset = 'digits'
  c.data_dir = ''
  c.samples_per_class = 10
  c.val_per_class = 10
  c.data_seed = 0
  c.image_size = 0     # 0: native size; N or (H, W): resize on load.
  c.channels = 0       # folder datasets: 1 (grey) or 3 (RGB, the default).
  # Grammar in smallfx/augment.py. Fashion-MNIST, SmallCNN, 10 and 50 per class,
  # 3 seeds (experiments/augment/): +1.9 and +1.5 points over no augmentation, better
  # on every seed; ~3% of a ResNet-20 step on CPU. crop(pad=4)|flip was below none.
  c.augment = 'crop(pad=2)|flip|trivial'

  # Model and loss.
  c.model = 'resnet20'
  c.width = 1.0
  c.dtype = 'float32'
  c.loss = 'cosine'
  c.embedding_dim = 0  # 0: one output per class (one-hot cosine targets).
  # Fine-tuning: a workdir of tools/convert_torch.py (or of a run), or an
  # architecture whose weights a pip package ships (converted on the fly).
  c.pretrained = ''
  c.finetune = 'full'          # 'full' or 'linear' (frozen backbone).
  c.backbone_lr_mult = 0.1     # 'full': the backbone learns this much slower.
  c.freeze_bn = True           # keep the pretrained BatchNorm statistics.

  # Optimisation. Durations: `num_steps` if > 0, else `num_epochs` over the training split.
  c.batch_size = 32
  c.num_steps = 0
  c.num_epochs = 300.0
  c.optimizer = 'sgd'
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.schedule = 'cosine'
  c.warmup_steps = 50
  c.sgdr_cycles = 3
  c.grad_clip_norm = 0.0

  # Seeds: `num_seeds` models train together as one vmapped program.
  c.seed = 0
  c.num_seeds = 1
  c.resample_per_seed = False
  # Devices along the seed axis; the rest split the batch. 0: on CPU, seeds run side
  # by side on the cores (train.cpu_devices_for_seeds); elsewhere 1.
  c.seed_devices = 0
  # Train steps per call of the compiled program; 0: by backend (1 on CPU, 25 on
  # GPU: train.steps_per_dispatch says why).
  c.steps_per_dispatch = 0
  c.distributed = False  # multi-host: jax.distributed.initialize() from the environment.

  # Bookkeeping.
  c.log_every_steps = 50
  c.eval_every_steps = 200
  c.checkpoint_every_steps = 500
  c.eval_batch_size = 500
  c.baseline = 'random_forest'
  c.progress = True
  return c
