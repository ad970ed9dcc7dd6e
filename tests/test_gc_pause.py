"""A step holds Python's cyclic collector off (``optzoo._gc``): thousands of parameters' small containers
never trigger a collection, the collector is left as the caller had it, and a closure runs with it on."""
import contextlib
import gc

import pytest
import torch

import optzoo
import optzoo.torch as ot


def small_params(n=3000):
    params = [torch.nn.Parameter(torch.randn(8)) for _ in range(n)]
    for p in params:
        p.grad = torch.randn(8)
    return params


@contextlib.contextmanager
def counting_collections():
    seen = []

    def callback(phase, info):
        if phase == "start":
            seen.append(info["generation"])

    gc.collect()
    gc.callbacks.append(callback)
    try:
        yield seen
    finally:
        gc.callbacks.remove(callback)


def test_a_step_over_thousands_of_parameters_triggers_no_collection(monkeypatch):
    params = small_params()
    opt = ot.Adam(params, lr=0.01)
    opt.step()  # states made
    with counting_collections() as seen:
        for _ in range(3):
            opt.step()
    assert seen.count(0) <= 1 and not set(seen) - {0}  # at most one young collection, due as a step ends
    # negative control: without the pause the same steps collect, over and over
    monkeypatch.setattr(ot, "_gc_paused", contextlib.nullcontext)
    with counting_collections() as seen:
        for _ in range(3):
            opt.step()
    assert len(seen) >= 10


@pytest.mark.parametrize("kind", ["updater", "update"])
def test_an_mxnet_style_call_over_thousands_of_parameters_triggers_no_collection(kind):
    """The Updater (MXNet's ``get_updater``) and ``update`` hold the collector off as the torch face does: its
    steady-state checks build a few containers per parameter."""
    ws = [torch.randn(8) for _ in range(3000)]
    gs = [torch.randn(8) for _ in ws]
    opt = optzoo.optimizer.create("adam")
    up = optzoo.optimizer.get_updater(opt)
    states = [opt.create_state(k, w) for k, w in enumerate(ws)]
    idx = list(range(len(ws)))
    if kind == "updater":
        call, bare = (lambda: up(idx, gs, ws)), (lambda: type(up).__call__.__wrapped__(up, idx, gs, ws))
    else:
        call = lambda: opt.update(idx, ws, gs, states)  # noqa: E731
        bare = lambda: type(opt).update.__wrapped__(opt, idx, ws, gs, states)  # noqa: E731
    call()  # states made, checks remembered
    with counting_collections() as seen:
        for _ in range(3):
            call()
    assert seen.count(0) <= 1 and not set(seen) - {0}
    with counting_collections() as seen:  # negative control: the same calls without the pause collect
        for _ in range(3):
            bare()
    assert len(seen) >= 3


@pytest.mark.parametrize("face", ["torch", "trainer", "update", "updater"])
def test_the_collector_is_left_as_the_caller_had_it(face):
    params = small_params(5)
    if face == "torch":
        opt = ot.SGD(params, lr=0.1)
        step = opt.step
    elif face == "trainer":
        trainer = optzoo.Trainer({f"p{k}": p for k, p in enumerate(params)}, "sgd", {"learning_rate": 0.1})
        step = lambda: trainer.step(1)  # noqa: E731
    elif face == "updater":
        up = optzoo.optimizer.get_updater(optzoo.optimizer.create("sgd", learning_rate=0.1))
        step = lambda: up(list(range(5)), [p.grad for p in params], [p.detach() for p in params])  # noqa: E731
    else:
        opt = optzoo.optimizer.create("sgd", learning_rate=0.1)
        states = [opt.create_state(k, p.detach()) for k, p in enumerate(params)]
        step = lambda: opt.update(list(range(5)), [p.detach() for p in params],  # noqa: E731
                                  [p.grad for p in params], states)
    assert gc.isenabled()
    step()
    assert gc.isenabled()
    gc.disable()
    try:
        step()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_closure_runs_with_the_collector_on_and_a_failing_step_restores_it():
    params = small_params(5)
    opt = ot.SGD(params, lr=0.1)
    during = []

    def closure():
        during.append(gc.isenabled())
        return torch.tensor(0.0)

    opt.step(closure)
    assert during == [True] and gc.isenabled()
    opt.param_groups[0]["lr"] = float("nan")
    with pytest.raises(ValueError):
        opt.step()
    assert gc.isenabled()
