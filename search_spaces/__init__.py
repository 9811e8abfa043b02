"""Grid files: what a sweep runs, validated before anything runs.

A grid is a YAML file (read with `yaml.safe_load`; tags such as ``!!python/object`` are
refused). Every section except ``name`` and ``axes`` is optional; unknown keys are errors.

.. code-block:: yaml

    name: quickstart          # sweep name, ^[a-z0-9][a-z0-9_-]{0,63}$ (it names a directory)
    max_trials: 5000          # larger grids need --confirm-large (build_plan(confirm_large=True))
    plugins: [my_lab.nptm]    # modules imported first: they register models, datasets, pruners
                              # and schedules (docs/plugins.md); workers import them too
    data:
      root: null              # dataset root; the CLI's --data-root / NPTM_DATA override it
      val_fraction: 0         # in [0, 0.5]: share of the training set held out for selection
                              # (0: train on the whole training set, as the paper does)
      download: false
    seeds:
      pretrain: per_trial     # per_trial: every seed pre-trains and prunes its own network;
                              # shared: one pre-trained network per (dataset, model), pruned
                              # once per methodical pruner target, that every seed of
                              # axes.seed retrains (the paper's protocol); retraining keeps
                              # its train/val split
      shared_seed: 0          # the seed of that shared pre-training and pruning
      random_masks: per_seed  # with shared: a random pruner (random, random_filter) draws one
                              # mask per seed, as rerunning the authors' unseeded scripts does;
                              # shared: one mask, drawn with shared_seed, for every seed
    pretrain:                 # overrides of each dataset's default recipe (nptm.trainables.recipe)
      from: null              #   existing weights instead of pre-training: a state_dict file,
                              #   an unpruned nptm model.pt (path or URI), or torchvision (the
                              #   local torch cache); one (dataset, model) pair, no wr; the
                              #   recipe then states how those weights were trained (lrw, ft)
      epochs: 30              #   a Recipe field here applies to every dataset ...
      cifar10: {lr: 0.05}     #   ... one under a dataset name to that dataset only
      batch_size: 64          #   the GLOBAL batch of one optimizer step: each of the
                              #   workers_per_trial DDP workers takes batch_size / workers
    resources:
      executor: inline        # inline (one process per trial) | train (Ray Train DDP workers)
      workers_per_trial: 1    # DDP workers; inline requires 1; must divide every batch_size
      cpus_per_worker: 1      # > 0, fractions allowed
      gpus_per_worker: 0      # >= 0; a fraction (0.25: four trials share a GPU; then
                              # workers_per_trial 1 under train) or a whole number
      max_concurrent: null    # optional cap on concurrently running stages
      precision: fp32         # fp32 (the paper's) | bf16: bfloat16 autocast of forward passes;
                              # part of a stage's identity and recorded in each row
    iterative:
      rounds: 1               # k > 1: k rounds of prune -> retrain (unstructured pruners only)
    axes:                     # the grid is the cross product of these lists
      dataset: [digits]       # a single value may be written without brackets
      model: [resnet20]
      pruner:                 # each entry: name + ratio (number or list) XOR preset (str or list)
        - {name: magnitude, ratio: [0.5, 0.9]}
        - {name: random, ratio: 0.9, layers: conv+linear, min_keep: 0.005}
        - {name: l1_filter, preset: [A, B]}
      schedule: [ft, lrw, wr, slr, clr, scratch]   # also scratch_e, scratch_b
      budget: [10, 20]        # retraining epochs, > 0 (<= pre-training epochs for lrw and wr);
                              # scratch_e / scratch_b train T / T x base/pruned MACs epochs
                              # instead, so their trials carry that length as their budget
      seed: [0, 1, 2]
      overrides:              # optional retraining-optimiser overrides swept as axes
        lr: [0.1, 0.05]       # (nptm.trainables.schedules.KNOWN_OVERRIDES)
    exclude:                  # drop every trial that matches ALL keys of a rule
      - {schedule: wr, budget: 160}
      - {pruner: l1_filter, preset: B}
    include:                  # extra trials (full combinations), added after exclusion
      - {dataset: digits, model: resnet20, pruner: random, ratio: 0.9,
         schedule: clr, budget: 30, seed: 0}

Rule keys (``exclude``/``include``): dataset, model, pruner, ratio, preset, schedule, budget,
seed, and override names such as ``lr``. An exclude rule takes one value per key and must match
at least one trial of the axes. An include entry lists a whole trial; overrides it does not
name are left at the schedule's defaults; one that is already in the grid is not added twice.

Unstructured pruner entries take two options (nptm.trainables.catalog.UNSTRUCTURED_OPTIONS):
``layers`` (``conv``, the default and the authors' setting, or ``conv+linear``) and ``min_keep``
(a per-layer floor; default 0, none). An entry with other options is another pruner setting.
Names are looked up in the registries of nptm.trainables.catalog; a renamed one (``taylor``) is
refused with its new name.

A trial is (dataset, model, pruner, ratio | preset, pruner options, schedule, budget, seed,
overrides).
Combinations are checked after exclusion, so a grid may cross models with presets only some
of them define and exclude the others (``{model: vgg16, preset: B}``).

`load_grid` / `parse_grid` return a `CheckedGrid`: the parsed `Grid` plus what planning needs
(each dataset's resolved recipe, the product space, the include trials), which is what
`nptm.orchestrator.planner.build_plan` takes.

`load_grid(path, overrides)` applies the command line's ``key.path=value`` pairs to the file's
data first (nptm.search_spaces.overrides), so an override is checked like the same edit.

Bounds: every number is one a run survives, and is checked before the first stage. Floats are
finite everywhere. Budgets and pre-training epochs are at most 100,000
(nptm.trainables.recipe.MAX_EPOCHS), and one run at most 50,000,000 optimizer steps (epochs x
ceil(training samples / batch_size); scratch_b's computed length too, at planning); batch_size
is at most 65,536, lr at most 100, weight_decay at most 1, milestones at most 100. Seeds lie in
[0, 2**32) (a stage seeds torch with ``seed * 2**20 + epoch``). CPU and GPU shares are whole
multiples of 0.0001, Ray's granularity (cpus_per_worker at most 1,024, gpus_per_worker 64),
workers_per_trial at most 1,024, max_concurrent 100,000, iterative.rounds 100, max_trials
1,000,000, and the axes multiply to at most 1,000,000 trials before any exclude rule (counted
from the lists' lengths, so a huge product is refused at once). Canonical values: a ratio,
min_keep and val_fraction are rounded to 6 decimals and an lr override to 6 significant digits
(-0.0 is 0.0), and two values of one axis that round alike are refused as listed twice: the
report never pools two stage chains as seeds. A grid file is a regular file of at most 16 MiB
that nests at most 32 levels (aliases included); a scalar must construct as its tag says, a key
is a scalar, ``<<`` merges mappings. ``pretrain.from`` is a regular, non-empty file of at most
4 GiB (never a FIFO or a device), read within 300 s, from a local path or a file://, s3://,
gs://, gcs://, hdfs://, viewfs://, abfs:// or abfss:// URI, holding a state_dict of finite tensors.

Every mistake raises `GridError` whose message reads ``FILE: FIELD.PATH: problem with VALUE``,
e.g. ``grid.yaml: axes.pruner[1].ratio: 1.5 is outside [0, 1)`` or
``grid.yaml: resources.exector: unknown key; did you mean 'executor'?``.
"""

from nptm.search_spaces.checks import CheckedGrid
from nptm.search_spaces.errors import GridError
from nptm.search_spaces.loader import load_grid, parse_grid
from nptm.search_spaces.schema import Grid

__all__ = ["CheckedGrid", "Grid", "GridError", "load_grid", "parse_grid"]
