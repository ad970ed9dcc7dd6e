"""PLACEHOLDER: being written (issue 2). Schedulers are callables of num_update."""


class LRScheduler:
    def __init__(self, base_lr=0.01, warmup_steps=0, warmup_begin_lr=0, warmup_mode="linear"):
        self.base_lr = base_lr
