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
    mtl.dense_losses, mtl.loss_weights, mtl.dense_metrics, mtl.dense_train
                    the paper's dense datasets: per-task losses, loss weightings
                    (recipe/equal/uw/dwa), metrics and delta_m, the training run of
                    ``train_dense.py``

Imports only run downwards (data -> models -> methods, metrics -> benchmarks -> train; plots
reads data and results; data -> models -> dense_losses, loss_weights -> dense_train): no
circle (tests/test_mtl_package.py checks), and no module imports a program.
"""
