"""optzoo.torch inside the tools users train with, run for real: Lightning and the Hugging Face Trainer
(their own loops, checkpoints and resume) and safetensors. Each run is checked against an independent
source: the same training in a plain PyTorch loop, and an uninterrupted run for a resumed one (bit for bit:
same data, same order, CPU). Skipped where the tool is not installed (``pip install -e '.[integration]'``)."""
import copy
import os
import warnings

import pytest
import torch

import optzoo.torch as ot

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: the models here are built in the test

BATCHES, STEPS, SPLIT = 3, 6, 3  # two epochs of three batches, checkpointed at the end of the first
LR_MILESTONE = 2  # MultiStepLR's milestone: the resumed half runs with the decayed lr


def _data(n=BATCHES * 8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen)
    return x, (x @ torch.randn(5, 1, generator=gen)).squeeze(1) + 0.1 * torch.randn(n, generator=gen)


def _net(seed=1):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _optimizer(name, params):
    return {"lamb": lambda: ot.LAMB(params, lr=0.02, wd=0.01),
            "adam": lambda: ot.Adam(params, lr=0.01),
            "sgd": lambda: ot.SGD(params, lr=0.05, momentum=0.9),
            "torch_adam": lambda: torch.optim.Adam(params, lr=0.01)}[name]()


def _in_order(steps=STEPS):
    x, y = _data()
    return [(x[8 * (k % BATCHES):8 * (k % BATCHES) + 8], y[8 * (k % BATCHES):8 * (k % BATCHES) + 8])
            for k in range(steps)]  # the batches in order, epoch after epoch


def _plain_loop(name, batches=None):
    """The reference: the same batches, optimizer and schedule in a plain PyTorch loop, uninterrupted."""
    net = _net()
    opt = _optimizer(name, net.parameters())
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[LR_MILESTONE], gamma=0.1)
    for xb, yb in (batches if batches is not None else _in_order()):
        loss = ((net(xb).squeeze(1) - yb) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return [p.detach().clone() for p in net.parameters()]


def _same(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert torch.equal(u, v), (u - v).abs().max()


# ---------------------------------------------------------------------------------------------- Lightning
def _lightning():
    return pytest.importorskip("lightning.pytorch")


def _module(L, name, seen=None):
    class Regression(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _net()

        def training_step(self, batch, _):
            xb, yb = batch
            if seen is not None:
                seen.append((xb.clone(), yb.clone()))
            return ((self.net(xb).squeeze(1) - yb) ** 2).mean()

        def configure_optimizers(self):
            opt = _optimizer(name, self.parameters())
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[LR_MILESTONE], gamma=0.1)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Regression()


def _loader():
    x, y = _data()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)


def _fit(L, module, tmp_path, max_steps, ckpt=None):
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on dataloader workers and the like
        trainer.fit(module, _loader(), ckpt_path=ckpt)
    return trainer


@pytest.mark.parametrize("name", ["lamb", "adam", "sgd", "torch_adam"])
def test_lightning_fit_equals_a_plain_loop_and_resumes_bit_for_bit(name, tmp_path):
    """Lightning's own loop with an optzoo optimizer and a step-wise MultiStepLR equals the plain loop; a run
    checkpointed by Lightning after the lr milestone and resumed in a fresh Trainer and module equals the plain
    loop, uninterrupted, over the batches the two halves were fed (Lightning 2.6 feeds a resumed run's first
    batch twice: the control, torch's own Adam, shows it too), so the scheduled lr, the optimizer's state and
    its counts were restored."""
    L = _lightning()
    whole = _module(L, name)
    _fit(L, whole, tmp_path / "whole", STEPS)
    _same([p.detach() for p in whole.parameters()], _plain_loop(name))

    seen = []
    trainer = _fit(L, _module(L, name, seen), tmp_path / "first", SPLIT)
    ckpt = os.path.join(tmp_path, "split.ckpt")
    trainer.save_checkpoint(ckpt)
    resumed = _module(L, name, seen)
    resumed_trainer = _fit(L, resumed, tmp_path / "resumed", STEPS, ckpt=ckpt)
    opt = resumed_trainer.optimizers[0]
    assert opt.param_groups[0]["lr"] == pytest.approx(opt.defaults["lr"] * 0.1)  # past the milestone
    assert len(seen) == STEPS
    _same([p.detach() for p in resumed.parameters()], _plain_loop(name, seen))


# ---------------------------------------------------------------------------------------------- Hugging Face
class _Dataset(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = _data()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, k):
        return {"x": self.x[k], "labels": self.y[k]}


class _HFModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _net()

    def forward(self, x, labels=None):
        out = self.net(x).squeeze(1)
        return {"loss": ((out - labels) ** 2).mean(), "logits": out}


def _hf_train(tmp_path, name, max_steps, resume=None, save_steps=SPLIT):
    transformers = pytest.importorskip("transformers")
    model = _HFModel()
    opt = _optimizer(name, model.parameters())
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[LR_MILESTONE], gamma=0.1)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=8, save_steps=save_steps,
        save_strategy="steps", logging_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
        dataloader_drop_last=False, disable_tqdm=True, max_grad_norm=0.0, remove_unused_columns=False)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Dataset(), optimizers=(opt, sched))
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return trainer, model


@pytest.mark.parametrize("name", ["lamb", "adam", "torch_adam"])
def test_hugging_face_trainer_equals_a_plain_loop_and_resumes_bit_for_bit(name, tmp_path):
    """The Hugging Face Trainer with an optzoo optimizer and scheduler (``optimizers=``, no gradient clipping)
    equals the plain loop; resumed from its own checkpoint (optimizer and scheduler saved by the Trainer,
    loaded with ``weights_only`` torch.load, the model as safetensors) it ends where the uninterrupted run
    ends."""
    _, whole = _hf_train(tmp_path / "whole", name, STEPS, save_steps=100)
    want = _plain_loop(name)
    _same([p.detach() for p in whole.parameters()], want)

    _hf_train(tmp_path / "split", name, SPLIT)
    ckpt = tmp_path / "split" / f"checkpoint-{SPLIT}"
    assert (ckpt / "model.safetensors").exists() and (ckpt / "optimizer.pt").exists()
    trainer, resumed = _hf_train(tmp_path / "split", name, STEPS, resume=str(ckpt), save_steps=100)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(trainer.optimizer.defaults["lr"] * 0.1)
    _same([p.detach() for p in resumed.parameters()], want)


# ---------------------------------------------------------------------------------------------- safetensors
@pytest.mark.parametrize("fused", [None, False, True])
def test_safetensors_saves_a_model_stepped_by_optzoo(fused, tmp_path):
    """After optzoo steps, ``safetensors.torch.save_model`` accepts the model (each parameter owns its storage)
    and the file holds the stepped weights; the optimizer's state dict loads with ``weights_only=True``."""
    st = pytest.importorskip("safetensors.torch")
    net = _net()
    opt = ot.Adam(net.parameters(), lr=0.01, fused=fused)
    x, y = _data()
    for k in range(3):
        ((net(x[8 * k:8 * k + 8]).squeeze(1) - y[8 * k:8 * k + 8]) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    path = tmp_path / "model.safetensors"
    st.save_model(net, str(path))
    loaded = _net(seed=5)
    st.load_model(loaded, str(path))
    _same(list(loaded.parameters()), list(net.parameters()))
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    again = torch.load(tmp_path / "opt.pt", weights_only=True)
    fresh = ot.Adam(loaded.parameters(), lr=0.01, fused=fused)
    fresh.load_state_dict(copy.deepcopy(again))
    assert fresh.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
