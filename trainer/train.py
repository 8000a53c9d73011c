"""One training run: data -> network -> epochs -> run dir -> final test figure.

Read top to bottom: RunSpec (what to train), predict (a serving model's probabilities),
TrainingState (where the run is, what --resume restores), train_run (start or resume, the
epochs, Ctrl-C), train_epoch (one pass, minimizing objective.py's loss), and finish_run: the run
dir, then test accuracy by its own ServingModel (fp32, uint8 images: the module exported to ONNX).
Beside it: recipes.py, data.py (images, split, augmentation), environment.py (device, DDP,
precision), optim.py (optimizer, schedule, Lookahead), report.py (training record, progress).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ensemble_serving.datasets import Dataset
from ensemble_serving.metrics import expected_calibration_error, top_k_accuracy
from trainer import checkpoint, report
from trainer.data import NORMALIZATION, Augmentation, InMemoryLoader, Normalizer, PreparedData, prepare_data
from trainer.environment import Environment, apply_determinism, autocast_for
from trainer.errors import TrainerError, TrainingInterrupted
from trainer.models import build_model, count_parameters
from trainer.objective import CrossEntropy
from trainer.optim import Lookahead, lr_factor, make_optimizer, set_lr
from trainer.recipes import validate
from trainer.serving import serving_model_from

@dataclass
class RunSpec:
    dataset: str
    architecture: str
    hyper: dict  # the recipe with command-line overrides applied (see recipes.py)
    seed: int
    run_dir: Path
    val_fraction: float = 0.0
    split_seed: int = 0
    precision: str = "auto"
    channels_last: bool = True
    deterministic: bool = False
    resume: bool = False
    command: str = field(default_factory=lambda: " ".join(sys.argv))
    objective: CrossEntropy | None = None  # what to minimize (objective.py); None: CrossEntropy()
    on_epoch: Callable[[dict], None] | None = None  # called with each epoch's history row (trainer tune: prune)
    score_test: bool = True  # False (a tune trial): no test figure and no run dir record, the history only


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(model: nn.Module, images_nhwc: np.ndarray, device: torch.device, batch_size: int,
            autocast: contextlib.AbstractContextManager | None = None) -> np.ndarray:  # fmt: skip
    """Probabilities [N, C] (float32 numpy) from a ServingModel on uint8 NHWC images."""
    model.eval()
    outputs = []
    for start in range(0, len(images_nhwc), batch_size):
        batch = torch.from_numpy(images_nhwc[start : start + batch_size]).to(device)
        with autocast or contextlib.nullcontext():
            outputs.append(model(batch).float().cpu())
    return torch.cat(outputs).numpy() if outputs else np.zeros((0, 0), np.float32)


def nll(probabilities: np.ndarray, labels: np.ndarray) -> float:
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, 1e-12, None)).mean())


# --------------------------------------------------------------------------- the run


@dataclass
class TrainingState:
    """Where a run is; saved in checkpoint.pt after every epoch (and on Ctrl-C) for --resume."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # steps done in the current epoch (non-zero only after Ctrl-C)
    global_step: int = 0
    history: list[dict] = field(default_factory=list)  # one row per completed epoch
    train_seconds: float = 0.0
    train_cpu_seconds: float = 0.0

    @classmethod
    def from_checkpoint(cls, saved: dict) -> TrainingState:
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})


@dataclass
class _Run:
    """Everything one run trains with, built once by _set_up."""

    spec: RunSpec
    env: Environment
    data: PreparedData
    config: dict  # config.json as it will be written
    network: nn.Module
    model: nn.Module  # the network, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    lookahead: Lookahead | None
    loader: InMemoryLoader
    objective: CrossEntropy  # or any object with its interface (objective.py)
    normalize: Normalizer
    memory_format: torch.memory_format
    precision: str
    autocast: contextlib.AbstractContextManager | None
    scaler: torch.amp.GradScaler | None
    state: TrainingState = field(default_factory=TrainingState)

    @property
    def total_steps(self) -> int:
        return self.spec.hyper["epochs"] * len(self.loader)

    def save_state(self) -> None:
        if self.env.is_main:
            checkpoint.save_training_state(self.spec.run_dir, {
                **dataclasses.asdict(self.state), "network": self.network.state_dict(),
                "optimizer": self.optimizer.state_dict(), "lookahead": self.lookahead.slow if self.lookahead else None,
                "rng": torch.get_rng_state(), "hyperparameters": self.spec.hyper,
                "architecture": self.spec.architecture, "dataset": self.spec.dataset,
                "objective": self.objective.identity,
            })  # fmt: skip


def train_run(spec: RunSpec, env: Environment, train: Dataset, test: Dataset, console) -> dict:
    """Train one model into spec.run_dir; returns its summary (and test probabilities)."""
    run_dir = spec.run_dir
    spec.objective = spec.objective or CrossEntropy()
    saved = checkpoint.load_training_state(run_dir) if spec.resume else None
    if spec.resume and saved is None:
        finished = _finished_config(run_dir)
        if finished is not None:
            if env.is_main:
                console.print(f"[green]{run_dir} is already complete[/]; nothing to resume.")
            return _summary_from_config(run_dir, finished, test, env)
        if env.is_main:
            console.print(f"[yellow]{run_dir} has no checkpoint to resume; starting it afresh.[/]")
    if saved is not None:
        if (saved.get("architecture"), saved.get("dataset")) != (spec.architecture, spec.dataset):
            raise TrainerError(
                f"{run_dir} holds a {saved.get('architecture')} run on {saved.get('dataset')}, not "
                f"{spec.architecture} on {spec.dataset}; resume it with the same --dataset/--arch or pick another --name"
            )
        if saved.get("objective") != spec.objective.identity:  # e.g. another --teacher (None: `trainer train`)
            raise TrainerError(f"{run_dir} was trained towards {saved.get('objective') or 'the hard labels'}, not "
                               f"{spec.objective.identity or 'the hard labels'}; resume it with the same command")  # fmt: skip
        spec.hyper = saved["hyperparameters"]  # continue exactly the run that was interrupted
    validate(spec.hyper, spec.val_fraction, spec.precision, len(train), train.images.shape[1], env.world_size)
    if saved is None and (run_dir / checkpoint.CONFIG_FILE).exists() and env.is_main:
        console.print(f"[yellow]overwriting the existing run in {run_dir}[/]")

    run = _set_up(spec, env, train, test, fresh=saved is None)
    if saved is not None:
        _resume(run, saved)
        if env.is_main:
            console.print(f"resuming {run_dir} at epoch {run.state.epoch + 1}, step {run.state.step_in_epoch}")
    if env.is_main:
        _announce(run, console)
    _train_epochs(run, report.EpochProgress(console, enabled=env.is_main))
    if run.lookahead is not None:
        run.lookahead.finish(run.network)
    if not spec.score_test:  # a tune trial: its objective is the validation history, never the test set
        return {"history": run.state.history, "train_seconds": run.state.train_seconds}
    summary = finish_run(spec, env, run.network, run.config, run.data, run.state, run.precision) if env.is_main else {}
    if env.distributed:
        dist.barrier()
    return summary


def _set_up(spec: RunSpec, env: Environment, train: Dataset, test: Dataset, fresh: bool) -> _Run:
    """Seeds, precision, data on the device, the network, its optimizer and the loader."""
    h = spec.hyper
    height, width, channels = train.images.shape[1:]
    apply_determinism(spec.seed, spec.deterministic, env.device)
    precision, autocast = autocast_for(env.device, spec.precision)
    memory_format = torch.channels_last if spec.channels_last else torch.contiguous_format
    data = prepare_data(train, test, spec.val_fraction, spec.split_seed, env.device)
    norm = NORMALIZATION[spec.dataset]
    normalize = Normalizer(norm["mean"], norm["std"], env.device)

    network = build_model(spec.architecture, channels, len(data.class_names), height, **h["arch_args"])
    if hasattr(network, "init_whitening") and fresh:
        # A few thousand images pin down the 2x2 patch covariance well.
        network.init_whitening(normalize(data.train_images[:5000]))
    network = network.to(env.device, memory_format=memory_format)
    model = network
    if env.distributed:
        model = nn.parallel.DistributedDataParallel(network, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    targets = spec.objective.prepare(h, data, env.device)
    loader = InMemoryLoader(data.train_images, data.train_labels, h["batch_size"], Augmentation.from_dict(h["augmentation"]),
                            seed=spec.seed, rank=env.rank, world_size=env.world_size, extras=targets)  # fmt: skip
    return _Run(
        spec=spec, env=env, data=data, network=network, model=model, loader=loader, objective=spec.objective,
        config=_base_config(spec, data, (height, width, channels), norm, count_parameters(network)),
        optimizer=make_optimizer(network, h),
        lookahead=Lookahead(network, h["lookahead_every"], h["lookahead_decay"]) if h["lookahead"] else None,
        normalize=normalize, memory_format=memory_format, precision=precision, autocast=autocast,
        scaler=torch.amp.GradScaler("cuda") if precision == "fp16" else None,
    )  # fmt: skip


def _resume(run: _Run, saved: dict) -> None:
    """Weights, optimizer, Lookahead, RNG and position as checkpoint.pt saved them."""
    run.network.load_state_dict(saved["network"])
    run.optimizer.load_state_dict(saved["optimizer"])
    if run.lookahead is not None and saved.get("lookahead") is not None:
        run.lookahead.slow = {k: v.to(run.env.device) for k, v in saved["lookahead"].items()}
    torch.set_rng_state(saved["rng"])
    run.state = TrainingState.from_checkpoint(saved)


def _announce(run: _Run, console) -> None:
    """Mark the run dir as training and say what is about to happen."""
    spec, h, env = run.spec, run.spec.hyper, run.env
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    run.config["status"] = "training"
    checkpoint.write_config(spec.run_dir, run.config)
    console.print(
        f"[bold]{spec.run_dir.name}[/]: {spec.architecture} ({run.config['parameters']:,} params) on {spec.dataset}, "
        f"{len(run.data.train_labels):,} train / {len(run.data.val_labels):,} val images, {h['epochs']} epochs x "
        f"{len(run.loader)} steps, batch {h['batch_size']}, {env.device.type} {run.precision}"
        + (f", {env.world_size} processes" if env.distributed else "")
    )


def _train_epochs(run: _Run, progress: report.EpochProgress) -> None:
    """The remaining epochs, checkpointing after each; Ctrl-C saves and raises TrainingInterrupted."""
    state, epochs, steps = run.state, run.spec.hyper["epochs"], len(run.loader)
    # Shares the network's weights; its own buffers (scale, shift, view weights) move to the device.
    live_serving = serving_model_from(run.network, run.config).to(run.env.device)
    set_lr(run.optimizer, lr_factor(state.global_step, run.total_steps, run.spec.hyper), state.global_step // steps)
    try:
        while state.epoch < epochs:
            with progress.epoch(state.epoch, epochs, steps, state.step_in_epoch) as bar:
                row = train_epoch(run, bar)
            if run.env.is_main and len(run.data.val_labels):
                probs = predict(live_serving, run.data.val_images_nhwc, run.env.device,
                                run.spec.hyper["eval_batch_size"], run.autocast)  # fmt: skip
                row["val_loss"] = nll(probs, run.data.val_labels)
                row["val_accuracy"] = float((probs.argmax(1) == run.data.val_labels).mean())
            state.history.append(row)
            state.epoch += 1
            state.step_in_epoch = 0
            progress.epoch_done(row)
            run.save_state()
            if run.spec.on_epoch is not None:
                run.spec.on_epoch(row)
    except KeyboardInterrupt:
        if run.env.is_main:
            run.save_state()
            run.config.update(status="interrupted", epochs_completed=state.epoch)
            checkpoint.save_weights(run.spec.run_dir, run.network)
            checkpoint.write_config(run.spec.run_dir, run.config)
            report.write_history(run.spec.run_dir, state.history)
        raise TrainingInterrupted(
            f"interrupted at epoch {state.epoch + 1}, step {state.step_in_epoch}: checkpoint saved in "
            f"{run.spec.run_dir}; rerun the same command with --resume to continue"
        ) from None


def train_epoch(run: _Run, bar) -> dict:
    """One pass over the training data from state.step_in_epoch; its history row (validation not yet filled in)."""
    state, h, device = run.state, run.spec.hyper, run.env.device
    part_names = run.objective.part_names
    started, cpu_started = time.perf_counter(), time.process_time()
    run.network.train()
    totals = torch.zeros(3 + len(part_names), dtype=torch.float64, device=device)  # loss sum, correct, count, parts
    for images, labels, *targets in run.loader.epoch(state.epoch, start_step=state.step_in_epoch):
        x = run.normalize(images, run.memory_format)
        with run.autocast or contextlib.nullcontext():
            logits = run.model(x)
            loss, parts = run.objective(logits.float(), labels, *targets)
        run.optimizer.zero_grad(set_to_none=True)
        if run.scaler is not None:
            run.scaler.scale(loss).backward()
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            loss.backward()
            run.optimizer.step()
        state.global_step += 1
        state.step_in_epoch += 1
        set_lr(run.optimizer, lr_factor(state.global_step, run.total_steps, h), state.global_step // len(run.loader))
        if run.lookahead is not None:
            run.lookahead.step(run.network, state.global_step, run.total_steps)
        with torch.no_grad():
            counts = torch.stack([loss.detach().double() * len(labels), (logits.argmax(1) == labels).sum().double(),
                                  torch.tensor(float(len(labels)), dtype=torch.float64, device=device)])  # fmt: skip
            totals += torch.cat([counts, parts.double() * len(labels)])
        bar.advance(totals[:3])
    if run.env.distributed:
        dist.all_reduce(totals)
    epoch_seconds = time.perf_counter() - started
    state.train_seconds += epoch_seconds
    state.train_cpu_seconds += time.process_time() - cpu_started
    row = {"epoch": state.epoch + 1, "lr": run.optimizer.param_groups[0]["lr"],
           "train_loss": float(totals[0] / totals[2]), "train_accuracy": float(totals[1] / totals[2]),
           "val_loss": None, "val_accuracy": None, "epoch_seconds": round(epoch_seconds, 2)}  # fmt: skip
    row.update({f"train_{name}": float(totals[3 + i] / totals[2]) for i, name in enumerate(part_names)})
    return row


def finish_run(spec: RunSpec, env: Environment, network: nn.Module, config: dict, data: PreparedData,
               state: TrainingState, precision: str) -> dict:  # fmt: skip
    """Write the run dir, reload it, and measure with the reloaded ServingModel in fp32."""
    run_dir = spec.run_dir
    config["status"] = "complete"
    config["epochs_completed"] = state.epoch
    config["training"] = {
        # Wall time of the epochs (augmentation included, per-epoch validation excluded). The CPU
        # time says what the run costs when the machine is shared: ~ wall x threads when alone.
        "train_seconds": round(state.train_seconds, 1),
        "train_cpu_seconds": round(state.train_cpu_seconds, 1),
        "device": str(env.device), "precision": precision, "world_size": env.world_size,
        "torch_threads": torch.get_num_threads(), "channels_last": spec.channels_last,
        "cpu_count": os.cpu_count(), "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip
    checkpoint.save_weights(run_dir, network)
    checkpoint.write_config(run_dir, config)

    serving, _ = checkpoint.load_serving_model(run_dir)
    serving.to(env.device)
    batch = spec.hyper["eval_batch_size"]
    test_probs = predict(serving, data.test.images, env.device, batch)
    metrics = {"test_accuracy": float((test_probs.argmax(1) == data.test.labels).mean()),
               "test_loss": nll(test_probs, data.test.labels),
               "test_top5_accuracy": top_k_accuracy(test_probs, data.test.labels, min(5, test_probs.shape[1])),
               "test_ece": expected_calibration_error(test_probs, data.test.labels),
               "val_accuracy": None, "val_loss": None}  # fmt: skip
    if len(data.val_labels):
        val_probs = predict(serving, data.val_images_nhwc, env.device, batch)
        metrics["val_accuracy"] = float((val_probs.argmax(1) == data.val_labels).mean())
        metrics["val_loss"] = nll(val_probs, data.val_labels)
    config["metrics"] = {"evaluated_with": "load_serving_model, fp32, uint8 images", **metrics}
    checkpoint.write_config(run_dir, config)

    title = f"{run_dir.name}: {spec.dataset} test, accuracy {metrics['test_accuracy']:.2%}"
    per_class = report.write_test_report(run_dir, data.test.labels, test_probs, data.class_names, title)
    report.write_history(run_dir, state.history)
    report.save_curves_png(run_dir, state.history, run_dir.name)
    (run_dir / checkpoint.TRAINING_STATE_FILE).unlink(missing_ok=True)  # the run is complete
    return {"run_dir": run_dir, "config": config, "per_class": per_class, "test_probabilities": test_probs,
            "network": network}


def _base_config(spec: RunSpec, data: PreparedData, shape: tuple[int, int, int], norm: dict, params: int) -> dict:
    h = spec.hyper
    hyperparameters = {k: v for k, v in h.items() if k not in ("dataset", "arch_args")}
    return {
        "format_version": checkpoint.FORMAT_VERSION,
        "architecture": spec.architecture,
        "arch_args": h["arch_args"],
        "dataset": spec.dataset,
        "class_names": list(data.class_names),
        "input": {"height": shape[0], "width": shape[1], "channels": shape[2], "dtype": "uint8", "layout": "NHWC"},
        "normalization": {"mean": norm["mean"], "std": norm["std"]},
        "serving": {"tta": h["tta"]},
        "parameters": params,
        "seed": spec.seed,
        "split_seed": spec.split_seed,
        "val_fraction": spec.val_fraction,
        "train_samples": int(len(data.train_labels)),
        "val_samples": int(len(data.val_labels)),
        "hyperparameters": hyperparameters,
        "metrics": {},
        "versions": {"torch": torch.__version__, "torchvision": _package_version("torchvision"),
                     "python": platform.python_version(), "numpy": np.__version__},  # fmt: skip
        "command": spec.command,
        **spec.objective.config_entries(),
    }


def _package_version(name: str) -> str | None:
    """Installed version without importing the package (torchvision takes seconds to import)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _finished_config(run_dir: Path) -> dict | None:
    try:
        config = checkpoint.read_config(run_dir)
    except checkpoint.RunDirError:
        return None
    return config if config.get("status") == "complete" else None


def _summary_from_config(run_dir: Path, config: dict, test: Dataset, env: Environment) -> dict:
    """A finished run skipped by --resume still contributes to the ensemble figure."""
    if not env.is_main:
        return {}
    serving, _ = checkpoint.load_serving_model(run_dir)
    probs = predict(serving.to(env.device), test.images, env.device, config["hyperparameters"]["eval_batch_size"])
    return {"run_dir": run_dir, "config": config, "per_class": None, "test_probabilities": probs}
