"""The multi-task training programs' library: datasets, models, methods, metrics, training.

Imported with ``python/`` on ``sys.path`` (the programs at ``python/``'s top put it there)::

    mtl.data        datasets: the registry (`mtl.data.DATASETS`), one module per dataset
    mtl.models      backbones, the dense multi-task network, each benchmark's model adapter
    mtl.methods     the training step of every compared method (GD, PCGrad, ..., ours)
    mtl.metrics     per-task metrics and delta_m of the synthetic benchmarks
    mtl.benchmarks  data + model + losses + metrics of each in-memory benchmark, for mtl.train
    mtl.train       the harness: one method, one seed, one run
    mtl.results     the record of one run
    mtl.plots       PNG figures of runs

Imports only run downwards in that list's dependency order (data -> models -> methods,
metrics -> benchmarks -> train; plots reads data and results): no module imports a program.
"""
