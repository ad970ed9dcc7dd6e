"""``optzoo demo``: every optimizer trains a small network on the 8x8 digits through :class:`optzoo.Trainer`,
then a table (final training loss, held-out accuracy, ms per step, state bytes per parameter) and pictures:
the loss curves of all optimizers, and 2-D trajectories on classic test functions (the tutorial's diagrams).
Then the sparse example: a click-through model (hashed-feature embedding bag + MLP) on generated data, trained
with FTRL, Adam and AdaGrad with a row-sparse gradient (lazy update) and with the dense gradient of the same model:
a table (losses, AUC, ms per step, speed-up) and a picture.

Modules: :mod:`.data` (the digits shipped in ``optzoo/data``), :mod:`.train` (the network, the per-optimizer
settings, one training run), :mod:`.trajectories` (Rosenbrock, Beale, a narrow valley), :mod:`.sparse` (the
sparse example's data, model and runs), :mod:`.plots`,
:mod:`.report` (the table), :mod:`.run` (the whole job). The command line is :mod:`optzoo.cli`.
Needs the ``demo`` extra (matplotlib, rich): ``pip install 'optzoo[demo]'``.
"""
