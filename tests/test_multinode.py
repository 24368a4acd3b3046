"""Multi-node DDP and resuming on another number of processes, on one machine (gloo, CPU).

Two "nodes" are two launches on 127.0.0.1 through the repository's own launchers: the command
``scripts/slurm/train.sbatch --dry-run`` prints, started once per task under the SLURM_* variables
srun would set (Lightning's SLURMEnvironment), and ``scripts/torchrun.sh`` with NNODES / NODE_RANK /
GPUS_PER_NODE / MASTER_ADDR / MASTER_PORT. Every run records which samples each rank trained at each
step (``RecordSamples``), so the tests check that an epoch visits every sample once across all ranks
and that every layout trains, step for step, the samples one process with the same global batch
trains; the final weights are compared with that one process.

Weights are compared within ``rtol=1e-4, atol=1e-5`` (``assert_ddp_equals_one_process``): the
samples, the random draws, the step count and the lr schedule are identical, but DDP averages the
gradients of the ranks (an all-reduce) where one process averages over its whole batch, a different
float summation order.
"""
from __future__ import annotations

import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from agentlit.data.base import ResumableDataModule, ResumeError
from agentlit.data.sampling import ResumableDistributedSampler

from cli_helpers import QUICKSTART, ROOT, TINY, pythonpath, run_agentlit, run_main
from test_reliability import KILLER, assert_same_weights, overlay, weights

GLOBAL_BATCH = 8
# 1797 digits, 5 % for training: 89 images, 11 steps of 8 per epoch (the 89th sits out each epoch), 2 epochs
CLASSIFICATION = ["fit", "--config", QUICKSTART, *TINY, "--data.val_fraction", "0.95", "--trainer.limit_val_batches", "0",
                  "--trainer.max_epochs", "2", "--model.warmup_epochs", "1"]
# noise, timesteps, guidance dropout (0.5) and EMA on, as test_reliability's DIFFUSION; validation off
DIFFUSION_SMALL = ["fit", "--config", str(ROOT / "configs" / "generation" / "digits.yaml"), "--data.val_fraction", "0.95",
                   "--trainer.limit_val_batches", "0", "--trainer.check_val_every_n_epoch", "1", "--trainer.max_epochs", "2",
                   "--model.warmup_steps", "4",
                   "--model.ema_decay", "0.9", "--model.cfg_dropout", "0.5", "--trainer.enable_progress_bar", "false"]
TASKS = {"classification": CLASSIFICATION, "diffusion": DIFFUSION_SMALL}
STEPS, TRAIN_SIZE = 22, 89
PER_EPOCH = TRAIN_SIZE // GLOBAL_BATCH * GLOBAL_BATCH  # 88 samples in 11 steps

RECORDER = textwrap.dedent(
    """
    import os
    from lightning.pytorch.callbacks import Callback

    class _Keys:
        '''The training set, noting every key the loader asks for (in order: num_workers 0).'''
        def __init__(self, dataset, keys):
            self.dataset, self.keys = dataset, keys
        def __len__(self):
            return len(self.dataset)
        def __getitem__(self, key):
            self.keys.append(key)
            return self.dataset[key]

    class RecordSamples(Callback):
        '''Appends "step epoch index" for every sample this rank trains to <folder>/rank<global rank>.txt.'''
        def __init__(self, folder: str):
            self.folder, self.keys = folder, []
        def setup(self, trainer, pl_module, stage):
            dm = trainer.datamodule
            make = dm.train_loader
            dm.train_loader = lambda dataset, **kw: make(_Keys(dataset, self.keys), **kw)
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            # the loader fetches ahead: the oldest batch_size keys are this step's
            n = trainer.datamodule.batch_size
            taken, self.keys[:n] = self.keys[:n], []
            os.makedirs(self.folder, exist_ok=True)
            with open(os.path.join(self.folder, f"rank{trainer.global_rank}.txt"), "a") as f:
                f.writelines(f"{trainer.global_step} {e} {i}\\n" for e, i in taken)
    """
)


def _callbacks(tmp_path: Path, name: str, kill_at: int | None = None) -> str:
    """A config overlay recording the samples of run ``name`` (into ``<tmp_path>/<name>.samples``)
    and, with ``kill_at``, sending every rank SIGTERM at that step (agentlit saves last.ckpt and stops)."""
    (tmp_path / "recorder.py").write_text(RECORDER)
    (tmp_path / "killer.py").write_text(KILLER)
    text = f"""
    - class_path: recorder.RecordSamples
      init_args: {{folder: {name}.samples}}
    """
    if kill_at is not None:
        text += f"""
    - class_path: killer.KillAtStep
      init_args: {{step: {kill_at}, signame: SIGTERM}}
    """
    return overlay(tmp_path / f"{name}.yaml", text)


def samples(tmp_path: Path, *names: str) -> dict[int, list[tuple[int, int]]]:
    """step → sorted (epoch, index) pairs trained at that step by all ranks of the runs ``names``."""
    out: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for name in names:
        for f in (tmp_path / f"{name}.samples").glob("rank*.txt"):
            for line in f.read_text().split("\n"):
                if line:
                    step, epoch, index = map(int, line.split())
                    out[step].append((epoch, index))
    return {s: sorted(v) for s, v in sorted(out.items())}


def assert_every_sample_once_per_epoch(trained: dict[int, list[tuple[int, int]]]) -> None:
    """Each step trains one global batch; each epoch trains distinct samples, all but the
    ``TRAIN_SIZE mod GLOBAL_BATCH`` of an incomplete last global batch."""
    assert sorted(trained) == list(range(STEPS))
    assert all(len(v) == GLOBAL_BATCH for v in trained.values()), {s: len(v) for s, v in trained.items()}
    for epoch in range(STEPS * GLOBAL_BATCH // PER_EPOCH):
        seen = [i for v in trained.values() for e, i in v if e == epoch]
        assert len(seen) == len(set(seen)) == PER_EPOCH, f"epoch {epoch}: {len(seen)} trained, {len(set(seen))} distinct"
        assert set(seen) <= set(range(TRAIN_SIZE))


def last_ckpt(tmp_path: Path, root: str) -> dict:
    return weights(tmp_path / root / "version_0" / "checkpoints" / "last.ckpt")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference of each task, run once per module: one process, batch GLOBAL_BATCH, STEPS steps."""
    tmp_path = tmp_path_factory.mktemp("one_process")
    done: dict[str, dict] = {}

    def run(task: str) -> tuple[dict, dict]:
        if task not in done:
            name = f"{task}_one"
            run_agentlit(*TASKS[task], "--config", _callbacks(tmp_path, name), "--data.batch_size", str(GLOBAL_BATCH),
                         "--trainer.devices", "1", "--trainer.default_root_dir", name, cwd=tmp_path)
            done[task] = {"ckpt": last_ckpt(tmp_path, name), "samples": samples(tmp_path, name)}
            assert done[task]["ckpt"]["global_step"] == STEPS
            assert_every_sample_once_per_epoch(done[task]["samples"])
        return done[task]["ckpt"], done[task]["samples"]

    return run


# ------------------------------------------------------------------------------------- launchers
def _free_port(low: int = 20000, high: int = 30000) -> int:
    for _ in range(200):
        port = random.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "TORCHELASTIC_"))}
    env.pop("AGENTLIT_RUN_VERSION", None)
    # torchrun.sh calls `torchrun`: the one of this interpreter
    env.update(HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", **extra)
    return env


def _run_together(tmp_path: Path, name: str, launches: list[tuple[list[str], dict[str, str]]], timeout: float = 600) -> None:
    """Start every (command, environment) at once in ``tmp_path`` (output in ``<name>.<i>.log``) and wait
    for all; when one fails or time runs out, stop the others (they would wait for it) and show the logs."""
    logs = [tmp_path / f"{name}.{i}.log" for i in range(len(launches))]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                              start_new_session=True) for (cmd, env), log in zip(launches, logs)]
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        if any(p.returncode for p in procs) or time.monotonic() > deadline:
            time.sleep(3)  # let the others print why they stop
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            break
        time.sleep(0.2)
    failed = [(p, log) for p, log in zip(procs, logs) if p.returncode != 0]
    assert not failed, "\n".join(f"{shlex.join(p.args)} ended with {p.returncode}:\n{log.read_text()[-4000:]}" for p, log in failed)


def _config_and_overrides(args: list[str]) -> tuple[str, list[str]]:
    """``["fit", "--config", CONFIG, *overrides]`` → (CONFIG, overrides): what the launch scripts take."""
    assert args[:2] == ["fit", "--config"], args[:3]
    return args[2], args[3:]


def launch_torchrun(tmp_path: Path, args: list[str], nodes: int, per_node: int) -> None:
    """``scripts/torchrun.sh CONFIG overrides…`` once per node, NODE_RANK 0..nodes-1, on 127.0.0.1."""
    config, overrides = _config_and_overrides(args)
    port = str(_free_port())
    _run_together(tmp_path, "torchrun", [
        ([str(ROOT / "scripts" / "torchrun.sh"), config, *overrides],
         _env(NNODES=str(nodes), NODE_RANK=str(node), GPUS_PER_NODE=str(per_node), MASTER_ADDR="127.0.0.1",
              MASTER_PORT=port, PYTHONPATH=pythonpath(tmp_path)))
        for node in range(nodes)])


def slurm_command(args: list[str], nodes: int, per_node: int) -> list[str]:
    """The command ``scripts/slurm/train.sbatch --dry-run`` prints for ``nodes`` × ``per_node`` tasks."""
    config, overrides = _config_and_overrides(args)
    dry = subprocess.run([str(ROOT / "scripts" / "slurm" / "train.sbatch"), "--dry-run", config, *overrides],
                         env=_env(SLURM_NNODES=str(nodes), SLURM_NTASKS_PER_NODE=str(per_node)),
                         capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    comment, line = dry.stdout.strip().split("\n")
    assert f"{nodes} node(s), {per_node} task(s) per node ({nodes * per_node} processes)" in comment
    return shlex.split(line)


def launch_slurm(tmp_path: Path, args: list[str], nodes: int, per_node: int) -> None:
    """What srun does with the dry-run's command: one process per task, ranks in SLURM_* variables."""
    cmd = slurm_command(args, nodes, per_node)
    assert cmd[0] == "agentlit"
    job_id = str(_free_port(15000, 25000) - 15000)  # Lightning's SLURM port: 15000 + the job id's last 4 digits
    common = dict(SLURM_JOB_ID=job_id, SLURM_NNODES=str(nodes), SLURM_NTASKS_PER_NODE=str(per_node),
                  SLURM_NTASKS=str(nodes * per_node), SLURM_NODELIST="127.0.0.1", PYTHONPATH=pythonpath(tmp_path))
    _run_together(tmp_path, "slurm", [
        ([sys.executable, "-m", "agentlit", *cmd[1:]],
         _env(**common, SLURM_NODEID=str(node), SLURM_LOCALID=str(local), SLURM_PROCID=str(node * per_node + local)))
        for node in range(nodes) for local in range(per_node)])


# ------------------------------------------------------------------------------------------ tests
def test_slurm_dry_run_prints_the_per_node_command():
    cmd = slurm_command(["fit", "--config", "configs/quickstart.yaml", "--data.batch_size", "16"], nodes=4, per_node=8)
    assert cmd == ["agentlit", "fit", "--config", "configs/quickstart.yaml", "--trainer.num_nodes", "4",
                   "--trainer.devices", "8", "--trainer.strategy", "ddp", "--trainer.plugins",
                   "lightning.pytorch.plugins.environments.SLURMEnvironment", "--data.batch_size", "16"]


@pytest.mark.slow
@pytest.mark.parametrize("task,launcher,per_node", [
    ("classification", "slurm", 1),
    ("classification", "torchrun", 2),
    ("diffusion", "slurm", 2),
])
def test_two_nodes_train_what_one_process_trains(tmp_path, one_process, task, launcher, per_node):
    reference, reference_samples = one_process(task)
    name = f"{launcher}_2x{per_node}"
    args = [*TASKS[task], "--config", _callbacks(tmp_path, name), "--data.batch_size", str(GLOBAL_BATCH // (2 * per_node)),
            "--trainer.default_root_dir", name]
    {"slurm": launch_slurm, "torchrun": launch_torchrun}[launcher](tmp_path, args, nodes=2, per_node=per_node)
    trained = samples(tmp_path, name)
    assert len(list((tmp_path / f"{name}.samples").glob("rank*.txt"))) == 2 * per_node
    assert_every_sample_once_per_epoch(trained)
    assert trained == reference_samples  # step for step, the samples of one process
    assert_same_weights(reference, last_ckpt(tmp_path, name), STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("task,before,after", [("classification", 2, 1), ("diffusion", 1, 2)])
def test_resume_on_another_number_of_processes(tmp_path, one_process, task, before, after):
    """Stopped with SIGTERM mid-epoch 1 on ``before`` processes, resumed with --ckpt_path last on
    ``after``, per-process batch scaled to keep the global batch."""
    reference, reference_samples = one_process(task)
    kill_at = 14  # epoch 1 has steps 11..21: last.ckpt holds step 15, 4 steps into it

    def fit(processes: int, *extra: str, check: bool = True):
        return run_agentlit(*TASKS[task], *extra, "--data.batch_size", str(GLOBAL_BATCH // processes), "--trainer.devices",
                            str(processes), "--trainer.strategy", "ddp" if processes > 1 else "auto",
                            "--trainer.default_root_dir", "run", cwd=tmp_path, check=check)

    stopped = fit(before, "--config", _callbacks(tmp_path, "before", kill_at=kill_at), check=False)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert last_ckpt(tmp_path, "run")["global_step"] == kill_at + 1
    if after == 1:  # a resume that would change the global batch: one line naming the batch size that keeps it
        code, _, err = run_main(*TASKS[task], "--data.batch_size", str(GLOBAL_BATCH // before), "--trainer.devices", "1",
                                "--trainer.default_root_dir", "run", "--ckpt_path", "last", cwd=tmp_path)
        assert code == 2 and "Traceback" not in err, err[-3000:]
        assert err.strip().splitlines()[-1] == (
            f"agentlit: error: the checkpoint was trained with a global batch of {GLOBAL_BATCH} ({before} processes × "
            f"batch_size {GLOBAL_BATCH // before}); on 1 process keep it with --data.batch_size {GLOBAL_BATCH}")
    resumed = fit(after, "--config", _callbacks(tmp_path, "after"), "--ckpt_path", "last")
    assert "Restoring states from the checkpoint path" in resumed.stdout + resumed.stderr
    final = last_ckpt(tmp_path, "run")
    trained = samples(tmp_path, "before", "after")
    assert max(samples(tmp_path, "before")) == kill_at and min(samples(tmp_path, "after")) == kill_at + 1
    assert_every_sample_once_per_epoch(trained)  # none twice, none skipped
    assert trained == reference_samples
    assert final["lr_schedulers"] == reference["lr_schedulers"]
    assert_same_weights(reference, final, STEPS)


# --------------------------------------------------------------------------------- sampler units
@pytest.mark.parametrize("n,world,batch", [(31, 2, 8), (89, 4, 2), (100, 3, 5), (16, 2, 8)])
def test_sampler_deals_global_batches_without_padding(n, world, batch):
    """R ranks with batch b train, step for step, what one process with batch R·b trains (the
    DistributedSampler's padding would hand a rank a repeated sample in the last step)."""
    single = ResumableDistributedSampler(range(n), batch_size=world * batch, seed=1)
    ranks = [ResumableDistributedSampler(range(n), batch_size=batch, num_replicas=world, rank=r, seed=1) for r in range(world)]
    order, per_rank = [i for _, i in single], [[i for _, i in s] for s in ranks]
    steps = n // (world * batch)
    assert len(order) == len(single) == steps * world * batch and all(len(p) == len(s) == steps * batch for p, s in zip(per_rank, ranks))
    for t in range(steps):
        step = sorted(i for p in per_rank for i in p[t * batch: (t + 1) * batch])
        assert step == sorted(order[t * world * batch: (t + 1) * world * batch])
    assert len(set(order)) == len(order)


def test_sampler_resumes_on_another_world_size():
    """Stopped after 3 of 6 steps of epoch 2 on 2 ranks × 5, resumed on 1 × 10 and on 5 × 2: the
    remaining samples of the epoch, each once, and the next epoch complete."""
    data = range(64)

    def epoch_samples(world: int, resume: int | None) -> list[list[int]]:
        out = []
        for r in range(world):
            s = ResumableDistributedSampler(data, batch_size=10 // world, num_replicas=world, rank=r, seed=5)
            s.set_epoch(2)
            if resume is not None:
                s.resume_from(2, resume)
            out.append([i for _, i in s])
        return out

    full = epoch_samples(2, None)
    done = [i for p in full for i in p[:3 * 5]]
    for world in (1, 5):
        rest = [i for p in epoch_samples(world, 3) for i in p]
        assert len(rest) == 3 * 10 and sorted(done + rest) == sorted(i for p in full for i in p)


def test_resume_with_another_global_batch_is_one_clear_error():
    def module(batch_size: int, world: int, accumulate: int = 1) -> ResumableDataModule:
        dm = ResumableDataModule()
        dm.batch_size = batch_size
        dm.trainer = SimpleNamespace(world_size=world, accumulate_grad_batches=accumulate)
        return dm

    state = {"epoch": 1, "batches_done": 4, "batch_size": 8, "world_size": 2, "accumulate_grad_batches": 1}
    module(4, 4).load_state_dict(state)  # 4 × 4 = 2 × 8: fine
    module(16, 1).load_state_dict(state)
    with pytest.raises(ResumeError) as err:
        module(8, 3).load_state_dict(state)
    assert str(err.value) == ("the checkpoint was trained with a global batch of 16 (2 processes × batch_size 8), which "
                              "3 processes cannot split evenly; resume on 1, 2, 4, 8 or 16 processes "
                              "(--data.batch_size 16, 8, 4, 2, 1)")
    with pytest.raises(ResumeError, match=r"on 4 processes keep it with --data.batch_size 4$"):
        module(8, 4).load_state_dict(state)
    with pytest.raises(ResumeError, match=r"resume with --trainer.accumulate_grad_batches 1 "):
        module(4, 2, accumulate=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"fewer than one global batch of 16 \(2 process\(es\) × batch_size 8\)"):
        ResumableDistributedSampler(range(10), batch_size=8, num_replicas=2)
